"""keras-decoder: decoder inputs and attention masks for Keras 3.

Import the modules (``keras_decoder.masks``, ``keras_decoder.inputs``, ...) or
the names re-exported here. Set ``KERAS_BACKEND`` before importing.
"""

__version__ = "0.1.0"

from keras_decoder import masks  # noqa: F401
from keras_decoder.inputs import PrefixConditioning  # noqa: F401
from keras_decoder.inputs import RotaryEmbedding  # noqa: F401
from keras_decoder.inputs import SinusoidalPositionEncoding  # noqa: F401
from keras_decoder.inputs import TokenAndPositionEmbedding  # noqa: F401
from keras_decoder.inputs import shift_right  # noqa: F401
from keras_decoder.inputs import teacher_forcing  # noqa: F401
from keras_decoder.masks import causal_mask  # noqa: F401
from keras_decoder.masks import combine_masks  # noqa: F401
from keras_decoder.masks import cross_attention_mask  # noqa: F401
from keras_decoder.masks import joint_attention_mask  # noqa: F401
from keras_decoder.masks import padding_mask  # noqa: F401
from keras_decoder.masks import prefix_lm_mask  # noqa: F401
from keras_decoder.masks import segment_mask  # noqa: F401
from keras_decoder.masks import self_attention_mask  # noqa: F401
from keras_decoder.masks import sliding_window_mask  # noqa: F401
from keras_decoder.masks import to_additive  # noqa: F401
from keras_decoder.viz import plot_mask  # noqa: F401
from keras_decoder.audit import LeakageReport  # noqa: F401
from keras_decoder.audit import audit_causal_leakage  # noqa: F401
from keras_decoder.audit import audit_padding_leakage  # noqa: F401
from keras_decoder.layers import FeedForward  # noqa: F401
from keras_decoder.layers import TransformerDecoderBlock  # noqa: F401
from keras_decoder.layers import TransformerEncoderBlock  # noqa: F401
from keras_decoder.models import DecoderOnlyLM  # noqa: F401
from keras_decoder.models import Seq2SeqTransformer  # noqa: F401
from keras_decoder.rnn import BahdanauAttention  # noqa: F401
from keras_decoder.rnn import LuongAttention  # noqa: F401
from keras_decoder.rnn import RNNDecoder  # noqa: F401
from keras_decoder.attention import CrossAttention  # noqa: F401
from keras_decoder.attention import InteractingAttention  # noqa: F401
from keras_decoder.attention import MultiHeadAttention  # noqa: F401
from keras_decoder.attention import SelfAttention  # noqa: F401
from keras_decoder.attention import scaled_dot_product_attention  # noqa: F401
from keras_decoder.hub import Pretrained  # noqa: F401
from keras_decoder.hub import pretrained  # noqa: F401
from keras_decoder import generation  # noqa: F401
from keras_decoder.generation import BanTokens  # noqa: F401
from keras_decoder.generation import Beam  # noqa: F401
from keras_decoder.generation import Greedy  # noqa: F401
from keras_decoder.generation import MinNewTokens  # noqa: F401
from keras_decoder.generation import NoRepeatNGram  # noqa: F401
from keras_decoder.generation import RepetitionPenalty  # noqa: F401
from keras_decoder.generation import TopK  # noqa: F401
from keras_decoder.generation import TopP  # noqa: F401
from keras_decoder.generation import generate  # noqa: F401
