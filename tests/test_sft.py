"""Supervised fine-tuning: the loss mask in the training loss (main head and MTP), packing
conversations with segment ids that isolate them, the SFT data stores (records skipped and
counted, split by line, reuse), and an SFT run started from a pre-trained workdir.

References are independent of the code under test: the masked cross-entropy is recomputed in
float64 numpy from the logits with the rule written plainly (the target at t + k counts iff it is
an answer token of the same conversation); isolation compares a packed row's logits with each
conversation run alone; packing is checked by reading every conversation back out of the rows.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY32, init_params, jitted_forward, stdlib_corpus
from test_conversations import (GOOD, ONE_PER_REASON, jsonl_lines, plain_sentencepiece,
                                stdlib_texts)

from dsv3_jax.data import conversations as cv
from dsv3_jax.data import pipeline, sft
from dsv3_jax.data.corpus import DataError, unit_hash
from dsv3_jax.data.tokenizer import train_tokenizer
from dsv3_jax.model.transformer import ModelOutput
from dsv3_jax.train import losses
from dsv3_jax.train.loop import loss_fn, state_builder, train_and_evaluate
from dsv3_jax.train.run_config import base_config

RTOL32 = 2e-5  # float32 logits through a few layers against float64 / a separately run row


# ---- the loss mask in the loss ------------------------------------------------------------------

def _masked_ce64(logits, tokens, segment_ids, loss_mask, k):
    """float64: mean over t of -log softmax(logits[t])[tokens[t + k]] where the token at t + k is
    in the same (non-padding) conversation as t and marked by the loss mask."""
    logits = np.asarray(logits, np.float64)
    total, count = 0.0, 0
    b, t = tokens.shape
    for row in range(b):
        for i in range(t - k):
            j = i + k
            if segment_ids[row, j] != 0 and segment_ids[row, i] == segment_ids[row, j] \
                    and loss_mask[row, j]:
                z = logits[row, i] - logits[row, i].max()
                total += np.log(np.exp(z).sum()) - z[tokens[row, j]]
                count += 1
    return total / count, count


def _batch(seed=0, b=2, t=24, v=64):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, v, (b, t)).astype(np.int32)
    # Two conversations and padding in row 0, one conversation in row 1.
    segment_ids = np.array([[1] * 10 + [2] * 11 + [0] * 3, [1] * t], np.int32)[:b]
    loss_mask = (rng.random((b, t)) < 0.5).astype(np.int32) * (segment_ids != 0)
    return tokens, segment_ids, loss_mask


def test_the_loss_counts_only_marked_targets_main_head_and_mtp():
    tokens, segment_ids, loss_mask = _batch()
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 24, 64)).astype(np.float32) * 3
    mtp_logits = rng.standard_normal((1, 2, 24, 64)).astype(np.float32) * 3
    out = ModelOutput(logits=jnp.asarray(logits), hidden=None, mtp_logits=jnp.asarray(mtp_logits))
    _, terms = losses.training_loss(out, jnp.asarray(tokens), jnp.asarray(segment_ids),
                                    mtp_lambda=0.3, balance_alpha=0.0,
                                    loss_mask=jnp.asarray(loss_mask))
    ce, n_main = _masked_ce64(logits, tokens, segment_ids, loss_mask, 1)
    mtp_ce, n_mtp = _masked_ce64(mtp_logits[0], tokens, segment_ids, loss_mask, 2)
    assert 0 < n_main < 2 * 23 and n_mtp > 0
    np.testing.assert_allclose(float(terms["ce"]), ce, rtol=1e-6)
    np.testing.assert_allclose(float(terms["mtp_ce"]), mtp_ce, rtol=1e-6)
    norms = losses.loss_normalizers(jnp.asarray(segment_ids), 1, jnp.asarray(loss_mask))
    assert (float(norms["main"]), float(norms["mtp"][0])) == (n_main, n_mtp)
    # Without the mask every same-conversation target counts: another number.
    _, unmasked = losses.training_loss(out, jnp.asarray(tokens), jnp.asarray(segment_ids),
                                       mtp_lambda=0.3, balance_alpha=0.0)
    assert abs(float(unmasked["ce"]) - ce) > 1e-3


def test_the_chunked_path_applies_the_mask_as_the_full_logits_path():
    """Training takes the chunked cross-entropy (no logits held): same masked sums and gradient."""
    tokens, segment_ids, loss_mask = _batch(seed=2)
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.standard_normal((2, 24, 16)), jnp.float32)
    mtp_h = jnp.asarray(rng.standard_normal((1, 2, 24, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 64)) * 0.5, jnp.float32)

    def loss(h, w, chunked):
        out = (ModelOutput(logits=None, hidden=None, head_input=h, mtp_head_input=mtp_h,
                           head_kernel=w) if chunked else
               ModelOutput(logits=h @ w, hidden=None, mtp_logits=mtp_h @ w))
        return losses.training_loss(out, jnp.asarray(tokens), jnp.asarray(segment_ids),
                                    mtp_lambda=0.3, balance_alpha=0.0, chunk_tokens=7,
                                    loss_mask=jnp.asarray(loss_mask))[0]

    full, full_grad = jax.value_and_grad(loss, argnums=(0, 1))(h, w, False)
    chunked, chunked_grad = jax.value_and_grad(loss, argnums=(0, 1))(h, w, True)
    np.testing.assert_allclose(float(chunked), float(full), rtol=1e-6)
    for a, b in zip(chunked_grad, full_grad):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_unmarked_tokens_change_nothing_as_targets():
    """With the logits held fixed, any other user-turn tokens (unmarked) give the same loss and
    other answer tokens (marked) do not."""
    tokens, segment_ids, loss_mask = _batch(seed=4)
    logits = jnp.asarray(np.random.default_rng(5).standard_normal((2, 24, 64)), jnp.float32)
    out = ModelOutput(logits=logits, hidden=None)
    loss = lambda toks: float(losses.training_loss(
        out, jnp.asarray(toks), jnp.asarray(segment_ids), mtp_lambda=0.0, balance_alpha=0.0,
        loss_mask=jnp.asarray(loss_mask))[0])
    garbage = np.where(loss_mask == 0, (tokens + 17) % 64, tokens)
    assert loss(garbage) == loss(tokens)
    changed = np.where(loss_mask == 1, (tokens + 17) % 64, tokens)
    assert loss(changed) != loss(tokens)


@pytest.fixture(scope="module")
def model():
    cfg = TINY32
    model_, _, _ = state_builder(cfg, base_config("tiny").train, 32)
    return cfg, model_, init_params(cfg)


def test_garbage_user_turns_after_the_answers_leave_the_training_loss_unchanged(model):
    """The model's own loss (loop.loss_fn, chunked, with MTP): one conversation and the same
    one with other garbage in its user turns after the answer give the same loss; garbage in the
    user turn before the answer is context, so it may change the loss (it does)."""
    cfg, model_, params = model
    rng = np.random.default_rng(6)
    t = 32
    # [user 0..9 | answer 10..19 | user 20..31], all one conversation.
    mask = np.zeros((1, t), np.int32)
    mask[0, 10:20] = 1
    tokens = rng.integers(0, cfg.vocab_size, (1, t)).astype(np.int32)
    batch = lambda toks: {"tokens": jnp.asarray(toks), "segment_ids": jnp.ones((1, t), jnp.int32),
                          "positions": jnp.arange(t, dtype=jnp.int32)[None],
                          "loss_mask": jnp.asarray(mask)}
    train_cfg = base_config("tiny").train
    loss = jax.jit(lambda p, b: loss_fn(p, b, model=model_, train_cfg=train_cfg)[0])
    before = float(loss(params, batch(tokens)))
    later = tokens.copy()
    later[0, 20:] = rng.integers(0, cfg.vocab_size, t - 20)
    assert abs(float(loss(params, batch(later))) - before) <= 1e-6 * abs(before)
    earlier = tokens.copy()
    earlier[0, :10] = rng.integers(0, cfg.vocab_size, 10)
    assert abs(float(loss(params, batch(earlier))) - before) > 1e-4


# ---- packing ------------------------------------------------------------------------------------

def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, 500, n).astype(np.int32), rng.random(n) < 0.5) for n in lengths]


def test_pack_places_every_conversation_once_whole_and_in_its_own_segment():
    lengths = [5, 17, 32, 1, 9, 30, 2, 2, 16, 16, 11, 8, 27, 3]
    examples = _examples(lengths)
    packed = sft.pack(examples, 32, pad_id=2)
    tokens, segments, mask = packed["tokens"], packed["segment_ids"], packed["loss_mask"]
    found = []
    for r in range(len(tokens)):
        ids = segments[r]
        # segments are 1, 2, ... contiguous from the start, then padding (0) to the end
        real = ids[ids != 0]
        assert list(np.unique(real)) == list(range(1, real.max() + 1))
        assert np.all(np.diff(ids[: len(real)]) >= 0) and np.all(ids[len(real):] == 0)
        assert np.all(tokens[r, len(real):] == 2) and np.all(mask[r, len(real):] == 0)
        for s in range(1, real.max() + 1):
            found.append((tokens[r, ids == s].tolist(), mask[r, ids == s].tolist()))
        positions = pipeline.segment_positions(ids)
        for s in range(1, real.max() + 1):
            assert positions[ids == s].tolist() == list(range((ids == s).sum()))
    expected = sorted((ids.tolist(), m.astype(int).tolist()) for ids, m in examples)
    assert sorted(found) == expected
    assert len(tokens) == -(-sum(lengths) // 32)  # this set packs without waste
    again = sft.pack(examples, 32, pad_id=2)
    assert all(np.array_equal(again[k], packed[k]) for k in packed)
    with pytest.raises(ValueError, match="1 to seq_len=32"):
        sft.pack(_examples([33]), 32, pad_id=2)


def test_packed_conversations_do_not_see_each_other(model):
    """Each conversation's logits in a packed row (segment ids, positions restarting) equal its
    logits run alone; a conversation after another is unaffected by it."""
    cfg, _, params = model
    a, b = _examples([13, 11], seed=7)
    packed = sft.pack([a, b], 32, pad_id=2)
    row = {k: jnp.asarray(v) for k, v in packed.items()}
    positions = jnp.asarray(pipeline.segment_positions(packed["segment_ids"][0]))[None]
    forward = jitted_forward(cfg)
    logits = forward(params, row["tokens"], positions, row["segment_ids"]).logits[0]
    for ids, _ in (a, b):
        alone = forward(params, jnp.asarray(ids)[None]).logits[0]
        start = next(i for i in range(32 - len(ids) + 1)
                     if np.array_equal(packed["tokens"][0, i:i + len(ids)], ids))
        got = logits[start:start + len(ids)]
        err = float(jnp.max(jnp.abs(got - alone)))
        assert err <= RTOL32 * float(jnp.max(jnp.abs(alone))), err


# ---- the SFT stores -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft_tok")
    return train_tokenizer(stdlib_texts("json", "email"), str(folder / "tokenizer.model"),
                           vocab_size=512, num_threads=1)


def _data_cfg(corpus: str, tokenizer: str, seq_len: int = 96, fraction: float = 0.3):
    c = base_config("tiny").data
    c.task, c.corpus, c.tokenizer = "sft", corpus, tokenizer
    c.seq_len, c.batch_size, c.validation_fraction = seq_len, 2, fraction
    c.num_threads, c.prefetch = 0, 0
    return c


def _chats(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta json email parse value key list".split()
    say = lambda k: " ".join(rng.choice(words, k))
    return [{"messages": [{"role": "user", "content": f"q{i}: {say(3)}"},
                          {"role": "assistant", "content": f"a{i}: {say(4)}"}]}
            for i in range(n)]


def test_sft_stores_skip_and_count_bad_records_and_split_by_line(tmp_path, chat_tokenizer):
    path = tmp_path / "chats.jsonl"
    long_chat = {"messages": [{"role": "user", "content": "long " * 200},
                              {"role": "assistant", "content": "x"}]}
    records = [json.dumps(r) for r in _chats(40)] + jsonl_lines() + [json.dumps(long_chat)]
    path.write_text("\n".join(records) + "\n", encoding="utf-8")
    cfg = _data_cfg(str(path), chat_tokenizer.path)
    data = pipeline.prepare_data(cfg, str(tmp_path / "work"), model_vocab_size=512)
    # Recount from the file with the rule written here: line index -> split by SHA-1, then
    # the reader's verdict per record.
    expected = {s: dict.fromkeys(("kept", *cv.REASONS), 0) for s in ("train", "validation")}
    for line_number, messages, reason in cv.iter_records(path):
        split = ("validation" if unit_hash(f"chats.jsonl:{line_number - 1}") < 0.3
                 else "train")
        expected[split][reason or "kept"] += 1
    n_bad = sum(len(v) if isinstance(v, list) else 1 for v in ONE_PER_REASON.values())
    assert sum(sum(c.values()) for c in expected.values()) == 40 + 2 + n_bad + 1  # GOOD, GOOD_2
    for split, store in (("train", data.train), ("validation", data.validation)):
        counts = dict(store.counts)
        too_long = counts.pop("too_long")
        counts["kept"] += too_long
        assert counts == expected[split], split
        assert store.num_documents == store.counts["kept"]
    assert data.train.counts["too_long"] + data.validation.counts["too_long"] == 1
    # Every kept conversation is in the stored rows: its encoding, with its mask.
    seen = sum(int(data.train.sequence(i, 96)["segment_ids"].max())
               for i in range(data.train.num_sequences(96)))
    assert seen == data.train.counts["kept"]
    # Batches carry the loss mask; a second prepare reuses the stores.
    batch = pipeline.eval_batches(data, cfg, 1)[0]
    assert set(batch) == {"tokens", "segment_ids", "positions", "loss_mask"}
    assert batch["loss_mask"].shape == (2, 96) and 0 < batch["loss_mask"].sum()
    stamp = os.stat(os.path.join(data.train.path, "tokens.npy")).st_mtime_ns
    again = pipeline.prepare_data(cfg, str(tmp_path / "work"), model_vocab_size=512)
    assert os.stat(os.path.join(again.train.path, "tokens.npy")).st_mtime_ns == stamp
    assert again.train.tokens_sha1 == data.train.tokens_sha1


def test_sft_store_rows_hold_the_encoded_conversations_with_their_masks(tmp_path,
                                                                        chat_tokenizer):
    chats = _chats(12, seed=3)
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in chats), encoding="utf-8")
    data = pipeline.prepare_data(_data_cfg(str(path), chat_tokenizer.path, fraction=0.01),
                                 str(tmp_path / "w"), model_vocab_size=512)
    rows = [data.train.sequence(i, 96) for i in range(data.train.num_sequences(96))]
    stored = sorted((r["tokens"][r["segment_ids"] == s].tolist(),
                     r["loss_mask"][r["segment_ids"] == s].tolist())
                    for r in rows for s in range(1, r["segment_ids"].max() + 1))
    kept = [c["messages"] for i, c in enumerate(chats)
            if unit_hash(f"c.jsonl:{i}") >= 0.01]
    encoded = [cv.encode_conversation(m, chat_tokenizer) for m in kept]
    assert stored == sorted((ids.tolist(), mask.astype(int).tolist()) for ids, mask in encoded)


def test_sft_reasoning_last_trains_on_the_last_answers_reasoning(tmp_path, chat_tokenizer):
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                           {"role": "assistant",
                            "content": f"<think>\n{i} + 1 = {i + 1}\n</think>\n\n{i + 1}"}]}
             for i in range(8)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in chats), encoding="utf-8")
    stores = {}
    for reasoning in ("drop", "last"):
        cfg = _data_cfg(str(path), chat_tokenizer.path, fraction=0.01)
        cfg.sft_reasoning = reasoning
        data = pipeline.prepare_data(cfg, str(tmp_path / reasoning), model_vocab_size=512)
        row = data.train.sequence(0, 96)
        stores[reasoning] = chat_tokenizer.decode(row["tokens"][row["loss_mask"] == 1].tolist(),
                                                  keep_special=True)
        fingerprint = json.loads((tmp_path / reasoning / "sft" / "train" /
                                  "fingerprint.json").read_text())
        assert fingerprint["inputs"].get("reasoning") == (None if reasoning == "drop" else "last")
    assert "<think>" not in stores["drop"] and "+ 1 =" not in stores["drop"]
    assert stores["last"].count("<think>") == stores["last"].count("</think>") >= 1
    assert "+ 1 =" in stores["last"]
    bad = _data_cfg(str(path), chat_tokenizer.path)
    bad.sft_reasoning = "all"
    with pytest.raises(DataError, match="data.sft_reasoning='all' is not one of"):
        pipeline.check_data_config(bad)


def test_sft_data_refusals(tmp_path, chat_tokenizer):
    text = tmp_path / "notes.txt"
    text.write_text("plain text\n", encoding="utf-8")
    with pytest.raises(DataError, match="reads JSONL conversations") as e:
        pipeline.prepare_data(_data_cfg(str(text), chat_tokenizer.path), str(tmp_path / "a"),
                              model_vocab_size=512)
    assert "\n" not in str(e.value)
    chats = tmp_path / "c.jsonl"
    chats.write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    old = plain_sentencepiece(tmp_path)
    with pytest.raises(DataError, match="predates the chat markers"):
        pipeline.prepare_data(_data_cfg(str(chats), old), str(tmp_path / "b"),
                              model_vocab_size=512)
    long_only = tmp_path / "long.jsonl"
    long_only.write_text(json.dumps({"messages": [
        {"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "y"}]}),
        encoding="utf-8")
    with pytest.raises(DataError, match="no training conversation.*too long") as e:
        pipeline.prepare_data(_data_cfg(str(long_only), chat_tokenizer.path, fraction=0.01),
                              str(tmp_path / "c"), model_vocab_size=512)
    assert "data.seq_len" in str(e.value)
    bad_task = _data_cfg(str(chats), chat_tokenizer.path)
    bad_task.task = "chat"
    with pytest.raises(DataError, match="data.task='chat' is not one of"):
        pipeline.check_data_config(bad_task)


# ---- an SFT run from a pre-trained workdir ----------------------------------------------------

def _pretrain_config(corpus: str):
    c = base_config("tiny")
    c.model.vocab_size, c.model.max_seq_len = 512, 64
    c.data.corpus, c.data.seq_len, c.data.batch_size = corpus, 32, 4
    c.data.validation_fraction = 0.2
    c.train.steps, c.train.warmup_steps, c.train.lr = 2, 1, 1e-3
    c.train.eval_batches, c.train.log_every, c.train.checkpoint_every = 0, 1, 2
    c.train.async_checkpoint = False
    return c


def test_an_sft_run_starts_from_a_pretrained_workdir_and_trains_on_the_answers(tmp_path):
    import importlib.util

    (tmp_path / "corpus").mkdir()
    source = str(tmp_path / "pretrained")
    train_and_evaluate(_pretrain_config(stdlib_corpus(tmp_path / "corpus")), source)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps(r) for r in _chats(60) + [{"messages": "bad"}]),
                     encoding="utf-8")
    spec = importlib.util.spec_from_file_location(
        "sft_config", os.path.join(os.path.dirname(__file__), "..", "configs", "sft.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    assert (c.data.task, c.data.corpus) == ("sft", "builtin")
    c.model.vocab_size, c.model.max_seq_len = 512, 64
    c.data.corpus, c.data.seq_len, c.data.batch_size = str(chats), 64, 4
    c.data.validation_fraction, c.data.num_threads = 0.2, 0
    c.train.init_from, c.train.steps, c.train.warmup_steps = source, 3, 1
    c.train.eval_every, c.train.eval_batches, c.train.checkpoint_every = 3, 1, 3
    c.train.async_checkpoint = False
    workdir = tmp_path / "sft"
    result = train_and_evaluate(c, str(workdir))
    assert result["step"] == 3 and np.isfinite(result["eval"]["eval_loss"])
    # The tokenizer came over from the source; the data is packed conversations.
    assert (workdir / "tokenizer.model").read_bytes() == \
        (tmp_path / "pretrained" / "tokenizer.model").read_bytes()
    store = sft.ConversationStore(str(workdir / "sft" / "train"))
    assert store.counts["no_messages"] + sft.ConversationStore(
        str(workdir / "sft" / "validation")).counts["no_messages"] == 1
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 3]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_a_wrong_corpus_is_refused_before_the_weights_are_read(tmp_path):
    """The corpus is checked first: with a missing conversation file and a source that does not
    exist either, the error names the corpus (nothing slow was started)."""
    import contextlib

    from dsv3_jax.train.loop import Run

    c = base_config("tiny")
    c.data.task, c.data.corpus = "sft", str(tmp_path / "missing.jsonl")
    c.train.init_from = str(tmp_path / "no_source")
    with pytest.raises(DataError, match="missing.jsonl does not exist"):
        with contextlib.ExitStack() as stack:
            Run(c, str(tmp_path / "work"), stack)
    (tmp_path / "notes.txt").write_text("text\n", encoding="utf-8")
    c.data.corpus = str(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="reads JSONL conversations"):
        with contextlib.ExitStack() as stack:
            Run(c, str(tmp_path / "work"), stack)
