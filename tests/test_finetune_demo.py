"""Instruction-style fine-tuning of the shipped tiny LM with LoRA (issue 5, lesson 11).

The pretrained ``tiny-lm`` has read English and French number words, never
together. Here it learns ``"<en> one hundred and twelve <fr>" -> "cent
douze"``: rows are ``[START] prompt response [END]``, the prompt is masked out
of the loss (:func:`keras_decoder.finetune.prompt_loss_mask`), and only LoRA
adapters train (:func:`keras_decoder.finetune.enable_lora`, Keras's own LoRA).

Numbers 0..999; 40 of them are held out. With the settings below (LoRA rank
4 on query, value and the feed-forward layers: 3.9% of the weights; 150 steps)
the fine-tuned model gets 52% (jax), 65% (tensorflow) or 68% (torch) of the
held-out numbers exactly right, where the pretrained model gets none.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_decoder
from keras_decoder import finetune, generation

num2words = pytest.importorskip("num2words").num2words

HELD_OUT, WIDTH, NEW_TOKENS = 40, 28, 14
RANK, TARGETS = 4, ("query", "value", "hidden", "output")
STEPS, BATCH, LEARNING_RATE = 150, 32, 2e-2


def _prompt(number):
    return f"<en> {num2words(int(number), lang='en')} <fr>"


def _answer(number):
    return num2words(int(number), lang="fr")


def _rows(tokenizer, numbers):
    """``[START] prompt response [END]`` padded to ``WIDTH + 1`` → inputs, labels, weights."""
    prompts = tokenizer.tokenize([_prompt(k) for k in numbers]).to_list()
    answers = tokenizer.tokenize([_answer(k) for k in numbers]).to_list()
    ids = np.full((len(numbers), WIDTH + 1), tokenizer.pad_id, "int32")
    prompt_lengths = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        row = [tokenizer.start_id] + prompt + answer + [tokenizer.end_id]
        assert len(row) <= WIDTH + 1, row
        ids[i, : len(row)] = row
        prompt_lengths.append(1 + len(prompt))
    labels = ids[:, 1:]
    # Token t+1 is a label; it counts iff it is part of the response (or [END]).
    response = ops.convert_to_numpy(
        finetune.prompt_loss_mask(np.array(prompt_lengths, "int32"), WIDTH + 1))[:, 1:]
    return ids[:, :-1], labels, response * (labels != tokenizer.pad_id)


def _translate(model, tokenizer, numbers):
    """Greedy answers to the prompts (``generate`` with a KV cache)."""
    prompts = tokenizer.tokenize([_prompt(k) for k in numbers]).to_list()
    width = max(len(p) for p in prompts) + 1
    ids = np.full((len(numbers), width), tokenizer.pad_id, "int32")
    for i, prompt in enumerate(prompts):  # left padding: every prompt ends at the same column
        ids[i, width - 1 - len(prompt):] = [tokenizer.start_id] + prompt
    tokens = generation.generate(model, ids, max_new_tokens=NEW_TOKENS,
                                 stop_ids=tokenizer.end_id, pad_id=tokenizer.pad_id)
    return tokenizer.detokenize(np.asarray(tokens))


def _exact(outputs, numbers):
    return float(np.mean([o == _answer(k) for o, k in zip(outputs, numbers)]))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    keras.utils.set_random_seed(0)
    untuned, tokenizer = keras_decoder.pretrained("tiny-lm")
    numbers = np.random.default_rng(0).permutation(1000)
    held_out, train = numbers[:HELD_OUT], numbers[HELD_OUT:]
    before = _translate(untuned, tokenizer, held_out)
    # A separate copy to tune: `generate` keeps a compiled decode step per
    # model, which would not see the LoRA layers added after its first call.
    model = keras_decoder.pretrained("tiny-lm").model

    base = {w.path: np.array(ops.convert_to_numpy(w)) for w in model.weights}
    finetune.enable_lora(model, RANK, targets=TARGETS)
    fraction = finetune.trainable_fraction(model)
    x, y, w = _rows(tokenizer, train)
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  weighted_metrics=[])
    model.fit(x, y, sample_weight=w, batch_size=BATCH, epochs=STEPS * BATCH // len(x),
              shuffle=True, verbose=0)
    after = _translate(model, tokenizer, held_out)
    path = tmp_path_factory.mktemp("tuned") / "tiny_lm_en_fr.keras"
    model.save(path)
    return dict(model=model, tokenizer=tokenizer, held_out=held_out, before=before,
                after=after, base=base, fraction=fraction, path=path, x=x, y=y, w=w)


def test_prompt_is_masked_out_of_the_loss(tuned):
    tokenizer, x, y, w = tuned["tokenizer"], tuned["x"], tuned["y"], tuned["w"]
    fr = tokenizer.vocab.index("<fr>")
    for row_x, row_y, row_w in zip(x[:50], y[:50], w[:50]):
        counted = row_y[row_w > 0]
        # The labels that count: exactly the French answer, then [END].
        assert counted[-1] == tokenizer.end_id
        assert fr not in counted and tokenizer.vocab.index("<en>") not in counted
        # The first counted label is predicted from the "<fr>" input token.
        assert row_x[np.argmax(row_w > 0)] == fr


def test_few_parameters_train(tuned):
    assert 0 < tuned["fraction"] < 0.05
    trainable = [w.path for w in tuned["model"].trainable_weights]
    assert trainable and all("lora" in p for p in trainable)


def test_base_weights_are_bit_identical(tuned):
    model, base = tuned["model"], tuned["base"]
    lora = [w for w in model.weights if "lora" in w.path]
    assert lora and any(np.abs(ops.convert_to_numpy(w)).max() > 0 for w in lora)
    for weight in model.weights:
        if weight.path in base:
            np.testing.assert_array_equal(ops.convert_to_numpy(weight), base[weight.path],
                                          err_msg=weight.path)
    assert sum(w.path in base for w in model.weights) == len(base)


def test_fine_tuning_beats_the_pretrained_model(tuned):
    held_out = tuned["held_out"]
    before, after = _exact(tuned["before"], held_out), _exact(tuned["after"], held_out)
    print(f"held-out exact match: pretrained {before:.0%}, fine-tuned {after:.0%}")
    assert before <= 0.05, list(zip(tuned["before"][:5], held_out[:5]))
    # Measured: 0% -> 52% (jax), 65% (tensorflow), 68% (torch) of 40 held-out numbers.
    assert after >= 0.35, list(zip(tuned["after"][:8], [_answer(k) for k in held_out[:8]]))
    assert after - before >= 0.3


def test_save_and_reload_keep_the_behaviour(tuned):
    # Keras saves a LoRA layer's kernel merged (kernel + scale * A @ B): the
    # reloaded model is a plain DecoderOnlyLM that behaves like the tuned one.
    loaded = keras.saving.load_model(tuned["path"], compile=False)
    assert not any("lora" in w.path for w in loaded.weights)
    x = tuned["x"][:8]
    expected = ops.convert_to_numpy(tuned["model"](x))
    np.testing.assert_allclose(ops.convert_to_numpy(loaded(x)), expected, rtol=0, atol=1e-4)
    pretrained = keras_decoder.pretrained("tiny-lm").model
    assert np.abs(ops.convert_to_numpy(pretrained(x)) - expected).max() > 1e-1
    outputs = _translate(loaded, tuned["tokenizer"], tuned["held_out"])
    assert outputs == tuned["after"]
