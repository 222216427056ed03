"""make_loader: batch layout, bucketing, packing, sharding, order, state save/restore."""

import json

import numpy as np
import pytest

from hs2p_jax.config import DataConfig
from hs2p_jax.data.batching import first_fit, padding_fraction
from hs2p_jax.data.pipeline import make_loader
from hs2p_jax.data.templates import steerlm_generation_prompt, steerlm_text
from hs2p_jax.errors import UserError
from hs2p_jax.tokenizer import load_tokenizer

TOK = load_tokenizer("bytes")
N = 23


def _words(rng, n):
  return " ".join(f"w{int(x)}" for x in rng.integers(0, 100, n))


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
  rng = np.random.default_rng(0)
  rows = [{"prompt": f"q{i} " + _words(rng, int(rng.integers(1, 40))), "chosen": f"c{i} " + _words(rng, int(rng.integers(0, 30))),
           "rejected": f"r{i} " + _words(rng, int(rng.integers(0, 30))), "magnitude": float(i % 3 + 1)} for i in range(N)]
  path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _loader(path, fmt="pairs", task="pairs", batch_size=4, **kw):
  cfg_keys = {"max_length", "pad_multiple", "packing", "attributes", "overlong", "num_workers", "buckets"}
  cfg = DataConfig(train=path, validation=path, format=fmt, max_length=kw.pop("max_length", 512),
                   pad_multiple=kw.pop("pad_multiple", 32), **{k: kw.pop(k) for k in list(kw) if k in cfg_keys})
  return make_loader(cfg, TOK, split=kw.pop("split", "train"), task=task, batch_size=batch_size, **kw)


def _n_tokens(text):
  return len(TOK(text, add_special_tokens=False)["input_ids"])


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_pair_rows_and_score_positions(pairs_path):
  loader = _loader(pairs_path, shuffle=False, repeat=False)
  batches = list(loader)
  assert len(batches) == len(loader) == -(-N // 4)
  for b in batches:
    p = len(b["valid"])
    assert b["input_ids"].shape[0] == 2 * p and b["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(b["score_row"], np.arange(2 * p).reshape(p, 2))  # row 2i chosen, 2i+1 rejected
    for i in np.flatnonzero(b["valid"]):
      ex = loader.examples[b["example_id"][i]]
      assert b["magnitude"][i] == ex.magnitude
      for col, response in ((0, ex.chosen), (1, ex.rejected)):
        row, last = b["score_row"][i, col], b["score_index"][i, col]
        assert TOK.decode(b["input_ids"][row, :last + 1].tolist()) == steerlm_text(ex.prompt, response)
        assert TOK.convert_ids_to_tokens(int(b["input_ids"][row, last])) == "<extra_id_2>"
        assert (b["segment_ids"][row, :last + 1] == 1).all() and (b["segment_ids"][row, last + 1:] == 0).all()
  last = batches[-1]
  n_fill = 4 * len(batches) - N
  assert (~last["valid"]).sum() == n_fill and (last["example_id"][~last["valid"]] == -1).all()
  assert (last["magnitude"][~last["valid"]] == 0).all()


def test_bucketing_pads_to_a_multiple_and_caps_at_max_length(pairs_path):
  for max_length in (512, 224):
    loader = _loader(pairs_path, shuffle=False, repeat=False, max_length=max_length, batch_size=2, buckets="multiple")
    shapes = set()
    for b in loader:
      longest = max(_n_tokens(steerlm_text(e.prompt, r)) for e in (loader.examples[i] for i in b["example_id"])
                    for r in (e.chosen, e.rejected))
      t = b["input_ids"].shape[1]
      assert t == min(-(-longest // 32) * 32, max_length) and t % 32 == 0
      shapes.add(t)
    assert len(shapes) <= (512 - 192) // 32 + 1


def test_packing_holds_the_same_tokens_as_unpacked(pairs_path):
  plain = list(_loader(pairs_path, repeat=False, seed=3, batch_size=8, buckets="multiple"))
  packed = list(_loader(pairs_path, repeat=False, seed=3, batch_size=8, packing=True, buckets="multiple"))
  assert len(plain) == len(packed)
  for a, b in zip(plain, packed):
    np.testing.assert_array_equal(a["example_id"], b["example_id"])
    r = b["input_ids"].shape[0]
    assert b["input_ids"].shape[1] == 512 and r % 2 == 0 and r <= 16
    for row in b["segment_ids"]:  # segments 1..k, contiguous, then padding
      used = row[row > 0]
      assert (np.diff(used) >= 0).all() and set(used) == set(range(1, (used.max() if used.size else 0) + 1))
      assert (row[len(used):] == 0).all()
    for i in range(len(a["valid"])):
      for col in (0, 1):
        want = a["input_ids"][a["score_row"][i, col], :a["score_index"][i, col] + 1]
        row, last = b["score_row"][i, col], b["score_index"][i, col]
        seg = b["segment_ids"][row]
        got = b["input_ids"][row][seg == seg[last]]
        np.testing.assert_array_equal(got, want)
        assert last + 1 == 512 or seg[last + 1] != seg[last]
    lengths = (a["score_index"] + 1).ravel().tolist()
    assert r == -(-(max(first_fit(lengths, 512)) + 1) // 2) * 2  # first-fit rows, rounded up to even
    assert (b["segment_ids"] > 0).sum() == (a["segment_ids"] > 0).sum() == sum(lengths)
    assert padding_fraction(b) == pytest.approx(1 - sum(lengths) / b["segment_ids"].size)


def test_first_fit_decreasing():
  assert first_fit([5, 7, 3, 2], 10) == [1, 0, 0, 1]  # 7 then 5 open rows; 3 fits with 7, 2 with 5
  assert first_fit([], 10) == []


def test_regression_batches(tmp_path):
  path = tmp_path / "r.jsonl"
  rows = [{"prompt": f"p{i // 2}", "response": f"response {i}", "helpfulness": i % 5, "correctness": (i + 1) % 5,
           "coherence": 4, "complexity": 0, "verbosity": 2} for i in range(10)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  loader = _loader(str(path), fmt="helpsteer2", task="regression", batch_size=4, repeat=False, shuffle=False,
                   attributes="all")
  seen = []
  for b in loader:
    assert b["labels"].shape == (4, 9) and b["labels"].dtype == np.float32 and b["label_mask"].dtype == bool
    np.testing.assert_array_equal(b["score_row"], np.arange(4))
    for i in np.flatnonzero(b["valid"]):
      k = int(b["example_id"][i])
      seen.append(k)
      np.testing.assert_array_equal(b["labels"][i, 4:], [rows[k][a] for a in ("helpfulness", "correctness",
                                                                              "coherence", "complexity", "verbosity")])
      assert TOK.decode(b["input_ids"][i, :b["score_index"][i] + 1].tolist()) == steerlm_text(rows[k]["prompt"],
                                                                                             rows[k]["response"])
    assert not b["label_mask"][~b["valid"]].any()
  assert seen == list(range(10))


def test_prompt_batches_are_left_padded_generation_prompts(pairs_path):
  loader = _loader(pairs_path, task="prompts", batch_size=5, repeat=False, shuffle=False)
  for b in loader:
    assert set(b) == {"prompt_ids", "prompt_mask", "valid", "example_id"} and b["prompt_ids"].shape[1] % 32 == 0
    assert (b["prompt_mask"][:, -1] == 1).all()
    for i in np.flatnonzero(b["valid"]):
      ids = b["prompt_ids"][i][b["prompt_mask"][i] == 1]
      assert TOK.decode(ids.tolist()) == steerlm_generation_prompt(loader.examples[b["example_id"][i]].prompt)
      assert (np.diff(b["prompt_mask"][i]) >= 0).all()  # zeros, then ones


@pytest.mark.parametrize("packing", [False, True])
def test_processes_read_disjoint_shards_with_equal_shapes(pairs_path, packing):
  loaders = [_loader(pairs_path, batch_size=6, repeat=False, process_index=p, process_count=3, packing=packing)
             for p in range(3)]
  per_process = [list(ld) for ld in loaders]
  assert len({len(b) for b in per_process}) == 1
  ids = []
  for p, batches in enumerate(per_process):
    mine = np.concatenate([b["example_id"][b["valid"]] for b in batches])
    assert all(len(b["valid"]) == 2 for b in batches)
    ids.extend(mine.tolist())
  assert sorted(ids) == list(range(N))  # disjoint and covering
  # each global step holds the examples a single process reads at that step, whatever the process count
  single = list(_loader(pairs_path, batch_size=6, repeat=False, packing=packing))
  for step, alone in zip(zip(*per_process), single):
    assert np.concatenate([b["example_id"] for b in step]).tolist() == alone["example_id"].tolist()
  for step in zip(*per_process):  # every process builds the same shapes at every step (multi-host)
    assert len({b["input_ids"].shape for b in step}) == 1
  endless = [iter(_loader(pairs_path, batch_size=6, process_index=p, process_count=3, packing=packing)) for p in range(3)]
  for _ in range(5):
    assert len({next(it)["input_ids"].shape for it in endless}) == 1


def test_epochs_are_permutations_reshuffled_per_epoch(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(24)))
  it = iter(_loader(str(path), batch_size=4, seed=1))
  epochs = [np.concatenate([b["example_id"] for b in _take(it, 6)]) for _ in range(2)]
  for e in epochs:
    assert sorted(e.tolist()) == list(range(24))
  assert not np.array_equal(epochs[0], epochs[1])
  again = np.concatenate([b["example_id"] for b in _take(iter(_loader(str(path), batch_size=4, seed=1)), 6)])
  other = np.concatenate([b["example_id"] for b in _take(iter(_loader(str(path), batch_size=4, seed=2)), 6)])
  assert np.array_equal(again, epochs[0]) and not np.array_equal(other, epochs[0])


def test_state_restore_mid_epoch_gives_the_same_next_batches(pairs_path):
  loader = _loader(pairs_path, batch_size=4, seed=5)
  it = iter(loader)
  _take(it, 7)  # past the first epoch boundary (23 examples / 4 per batch)
  state = json.loads(json.dumps(loader.get_state()))
  assert state["step"] == 7
  want = _take(it, 4)
  fresh = _loader(pairs_path, batch_size=4, seed=5)
  fresh.set_state(state)
  got = _take(iter(fresh), 4)
  for a, b in zip(want, got):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  loader.set_state(state)  # rewinds the live iterator too
  assert np.array_equal(next(it)["example_id"], want[0]["example_id"])
  with pytest.raises(UserError, match="seed=5 does not match"):
    _loader(pairs_path, batch_size=4, seed=6).set_state(state)


def test_builtin_data_through_the_normal_file_path(tmp_path):
  cfg = DataConfig(train="builtin", validation=None, format="helpsteer2-preference", builtin_size=16, max_length=384)
  train = make_loader(cfg, TOK, split="train", task="pairs", batch_size=4, cache_dir=str(tmp_path))
  val = make_loader(cfg, TOK, split="validation", task="pairs", batch_size=4, repeat=False, cache_dir=str(tmp_path))
  assert train.report.source.endswith("preference.jsonl.gz") and train.report.dropped["other_split"] == 8
  assert 0 < len(val.examples) <= 8 and next(iter(train))["input_ids"].shape[0] == 8


def test_bad_arguments(pairs_path):
  with pytest.raises(UserError, match="batch size 5 must be a positive multiple of the process count 2"):
    _loader(pairs_path, batch_size=5, process_count=2)
  with pytest.raises(UserError, match="split 'test'"):
    _loader(pairs_path, split="test")
  with pytest.raises(UserError, match="data.format='pairs' cannot feed the regression task"):
    _loader(pairs_path, task="regression")


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_restorable_state(pairs_path):
  serial = _take(iter(_loader(pairs_path, batch_size=4, seed=2)), 6)
  loader = _loader(pairs_path, batch_size=4, seed=2, num_workers=2)
  it = iter(loader)
  first = _take(it, 3)
  state = json.loads(json.dumps(loader.get_state()))
  rest = _take(it, 3)
  loader.close()
  for a, b in zip(serial, first + rest):
    assert all(np.array_equal(a[k], b[k]) and type(b[k]) is np.ndarray for k in a)
  for workers in (2, 0):  # the state does not depend on the number of worker processes
    resumed = _loader(pairs_path, batch_size=4, seed=2, num_workers=workers)
    resumed.set_state(state)
    again = _take(iter(resumed), 3)
    resumed.close()
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(rest, again))


def test_bucket_lengths_by_multiple_power_of_two_or_list():
  from hs2p_jax.data.batching import bucket_length
  assert [bucket_length(n, 32, 512) for n in (1, 32, 33, 300, 600)] == [32, 32, 64, 320, 512]
  assert [bucket_length(n, 32, 512, "pow2") for n in (1, 32, 33, 65, 300, 600)] == [32, 32, 64, 128, 512, 512]
  assert [bucket_length(n, 32, 512, [100, 256]) for n in (1, 100, 101, 300)] == [100, 100, 256, 512]
