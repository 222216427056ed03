"""The JAX side: the reward-model training step and the sampler, compiled once on random weights of a
preset's shapes and timed synchronised (`block_until_ready`)."""

from __future__ import annotations

import os
import statistics
import time

from hs2p_jax.bench.measure import device_peak_bytes, peak_rss_bytes, rounded, times_of
from hs2p_jax.roofline.flops import PEAK_BANDWIDTH, device_family, peak_flops, sample_step_bytes, train_flops


def data_mesh(devices: int | None):
  """A data-parallel mesh over the first `devices` devices (None = all); None for one device."""
  import jax
  from hs2p_jax.sharding import MeshConfig, make_mesh
  devs = jax.devices()[:devices] if devices else jax.devices()
  return make_mesh(MeshConfig(data=-1), devs) if len(devs) > 1 else None


def random_split(kind: str, cfg, num_attributes: int = 9, mesh=None, seed: int = 0):
  """(graphdef, state) of a model with random weights drawn on the host (no per-op compiles):
  normal(0, 0.02) matrices, unit norms, zero biases; placed on `mesh` when given."""
  import jax
  import numpy as np
  from flax import nnx
  from hs2p_jax.model import create
  from hs2p_jax.sharding import state_shardings

  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create(kind, cfg, num_attributes)))
  rng = np.random.default_rng(seed)

  def one(v):
    axes = v.get_metadata().get("axes") or (None,) * len(v.shape)
    if axes[-1] == "norm":
      arr = np.ones(v.shape, np.float32)
    elif len([a for a in axes if a != "layers"]) <= 1:
      arr = np.zeros(v.shape, np.float32)
    else:
      arr = rng.standard_normal(v.shape, np.float32) * np.float32(0.02)
    return v.replace(arr)

  state = jax.tree.map(one, abstract, is_leaf=lambda v: isinstance(v, nnx.Variable))
  if mesh is None:
    return graphdef, jax.device_put(state)
  return graphdef, jax.device_put(state, state_shardings(state, mesh))


def rm_batch(pairs: int, seq: int, vocab: int, seed: int = 0, share_prompt: int = 0) -> dict:
  """Fixed-length random pairs of `seq` tokens, stacked as one micro-batch: rows [0, P) chosen, [P, 2P)
  rejected; or, with `share_prompt` = N > 0, pairs whose first N tokens are equal, one pair per row
  laid out as the data pipeline's `data.share_prompt` does ([N prompt | chosen | rejected])."""
  import numpy as np
  from hs2p_jax.data.batching import pack_units, shared_pair
  rng = np.random.default_rng(seed)
  magnitude = rng.integers(1, 4, (1, pairs)).astype(np.float32)
  if not 0 <= share_prompt < seq:
    raise ValueError(f"share_prompt={share_prompt}: must be in [0, seq={seq})")
  if share_prompt:
    units = []
    for _ in range(pairs):
      prompt = rng.integers(3, vocab, share_prompt)
      c, r = rng.integers(3, vocab, (2, seq - share_prompt))
      r[0] = c[0] + 1 if c[0] + 1 < vocab else 3  # the responses differ from their first token
      units += shared_pair(np.concatenate([prompt, c]), np.concatenate([prompt, r]), 2 * seq - share_prompt)
    rows, score_row, score_index = pack_units(units, 2 * seq - share_prompt, pairs, 0)
    return {**{k: v[None] for k, v in rows.items()}, "score_row": score_row.reshape(1, pairs, 2),
            "score_index": score_index.reshape(1, pairs, 2), "valid": np.ones((1, pairs), bool),
            "magnitude": magnitude}
  rows = 2 * pairs
  return {
      "input_ids": rng.integers(3, vocab, (1, rows, seq), dtype=np.int32),
      "segment_ids": np.ones((1, rows, seq), np.int32),
      "score_row": np.stack([np.arange(pairs), pairs + np.arange(pairs)], 1)[None].astype(np.int32),
      "score_index": np.full((1, pairs, 2), seq - 1, np.int32),
      "valid": np.ones((1, pairs), bool),
      "magnitude": magnitude,
  }


class RMStep:
  """The jitted scaled-BT training step (AdamW, clipping) of a reward model, compiled for one config
  and a fixed random batch. Variants of one preset share (params, opt_state) through `place`."""

  def __init__(self, cfg, pairs: int, seq: int, num_attributes: int = 9, donate: bool = True,
               devices: int | None = None, compiler_options: dict | None = None, share_prompt: int = 0):
    import jax
    from flax import nnx
    from hs2p_jax.model import create
    from hs2p_jax.sharding import state_shardings, use_mesh
    from hs2p_jax.feed import put_batch
    from hs2p_jax.train.optim import make_optimizer
    from hs2p_jax.train.rm import Objective, make_train_step
    from hs2p_jax.sharding import opt_state_shardings

    # tokens: the pairs' tokens (what an unshared step processes); flops: what this layout computes
    self.cfg, self.donate, self.tokens = cfg, donate, 2 * pairs * seq
    self.rows, self.row_len = (pairs, 2 * seq - share_prompt) if share_prompt else (2 * pairs, seq)
    self.flops = train_flops(cfg, self.rows, self.row_len)
    self.mesh = data_mesh(devices)
    self.num_devices = 1 if self.mesh is None else self.mesh.size
    weights = tuple(1.0 if i == min(4, num_attributes - 1) else 0.0 for i in range(num_attributes))
    self.tx = make_optimizer(2e-6, warmup_steps=10)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create("reward", cfg, num_attributes)))
    abs_opt = jax.eval_shape(self.tx.init, abstract)
    if self.mesh is None:
      dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      self.shardings = (jax.tree.map(lambda _: dev, abstract), jax.tree.map(lambda _: dev, abs_opt))
    else:
      psh = state_shardings(abstract, self.mesh)
      self.shardings = (psh, opt_state_shardings(abs_opt, psh, self.mesh))
    self.num_attributes, self.abstract = num_attributes, abstract
    self.batch = put_batch(rm_batch(pairs, seq, cfg.vocab_size, share_prompt=share_prompt), self.mesh, stacked=True)
    step = jax.jit(make_train_step(graphdef, self.tx, Objective("bt", "scaled", weights)),
                   donate_argnums=(0, 1) if donate else (), out_shardings=(*self.shardings, None))
    abs_args = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                            (abstract, abs_opt), self.shardings)
    with use_mesh(self.mesh):
      t0 = time.perf_counter()
      self.compiled = step.lower(*abs_args, {}, self.batch).compile(compiler_options)  # no frozen models
      self.compile_s = time.perf_counter() - t0

  def init_state(self) -> tuple:
    """Random parameters and a fresh optimizer state, placed for this step."""
    import jax
    _, params = random_split("reward", self.cfg, self.num_attributes, self.mesh)
    return self.place((params, jax.jit(self.tx.init)(params)))

  def place(self, state: tuple) -> tuple:
    import jax
    return jax.device_put(state, self.shardings)

  def __call__(self, state: tuple) -> tuple:
    """One step, synchronised: (params, opt_state) -> (params, opt_state, metrics)."""
    import jax
    params, opt_state, metrics = self.compiled(*state, {}, self.batch)
    jax.block_until_ready(metrics)
    return params, opt_state, metrics


def bench_rm_jax(cfg, pairs: int, seq: int, steps: int, num_attributes: int = 9, donate: bool = True,
                 devices: int | None = None, share_prompt: int = 0) -> dict:
  """Times `RMStep` on a random reward model: compile, one warm-up step, median of `steps`."""
  import jax
  step = RMStep(cfg, pairs, seq, num_attributes, donate, devices, share_prompt=share_prompt)
  box = {"s": step.init_state()}

  def run():
    *state, box["m"] = step(box["s"])
    box["s"] = tuple(state)

  t0 = time.perf_counter()
  run()
  warmup_s = time.perf_counter() - t0
  times = times_of(run, steps)
  step_s = statistics.median(times)
  kind = jax.devices()[0].device_kind
  peak = peak_flops(kind, cfg.dtype)
  return {
      "device_kind": kind, "platform": jax.devices()[0].platform, "num_devices": step.num_devices,
      "knobs": {"dtype": cfg.dtype, "scan_layers": cfg.scan_layers, "remat": cfg.remat, "attention": cfg.attention,
                "weight_grad": cfg.weight_grad, "donate": donate, "share_prompt": share_prompt,
                "xla_flags": os.environ.get("XLA_FLAGS")},
      "rows": step.rows, "row_tokens": step.row_len, "tokens_per_step": step.tokens, "compile_s": rounded(step.compile_s),
      "warmup_step_s": rounded(warmup_s), "step_s": rounded(step_s), "step_s_all": [rounded(t) for t in times],
      "tokens_per_s": rounded(step.tokens / step_s), "tokens_per_s_best": rounded(step.tokens / min(times)),
      "loss": rounded(float(box["m"]["loss"])),
      "model_flops_per_step": step.flops, "model_flops_per_s": rounded(step.flops / step_s),
      "peak_flops_per_s": peak, "mfu": rounded(step.flops / step_s / peak) if peak else None,
      "peak_rss_bytes": peak_rss_bytes(), "device_peak_bytes": device_peak_bytes(),
  }


class SampleRun:
  """`generate_from_state` (prefill + `new_tokens` decode steps, EOS disabled) of an LM, compiled for
  one config and fixed random prompts; variants of one preset share the parameter state."""

  def __init__(self, cfg, batch: int, prompt: int, new_tokens: int, temperature: float = 0.0,
               devices: int | None = None, compiler_options: dict | None = None, samples: int = 1,
               layout: str = "data"):
    """layout (several devices): `data` (replicated params, rows split), `fsdp` (the training
    layout: params sharded over fsdp, gathered at every token) or `rollout` (the same FSDP params
    copied into the rollout layout before each call, the copy timed with it, as REINFORCE does)."""
    import jax
    import numpy as np
    from flax import nnx
    from hs2p_jax.model import create
    from hs2p_jax.rl.layout import layout_for
    from hs2p_jax.sample import SamplingConfig, generate_from_state
    from hs2p_jax.sharding import DEFAULT_RULES, MeshConfig, make_mesh, state_shardings, use_mesh
    from hs2p_jax.feed import put_batch

    self.cfg, self.batch, self.new_tokens, self.rows = cfg, batch, new_tokens, batch * samples
    self.mesh = data_mesh(devices)
    if layout != "data" and self.mesh is not None:
      self.mesh = make_mesh(MeshConfig(data=1, fsdp=-1), list(self.mesh.devices.flat))
    self.num_devices = 1 if self.mesh is None else self.mesh.size
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create("lm", cfg)))
    self.sharding = (jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
                     if self.mesh is None else state_shardings(abstract, self.mesh))
    rng = np.random.default_rng(0)
    arrays = put_batch({"prompt_ids": rng.integers(3, cfg.vocab_size, (batch, prompt), dtype=np.int32),
                        "prompt_mask": np.ones((batch, prompt), np.int32)}, self.mesh)
    self.args = (arrays["prompt_ids"], arrays["prompt_mask"], jax.random.key(0))
    abs_state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract,
                             self.sharding)

    self.copy, mesh, gen_graphdef, gen_state = None, self.mesh, graphdef, abs_state
    if layout == "rollout" and self.mesh is not None:
      lay = layout_for(cfg, self.mesh, DEFAULT_RULES, rows=self.rows)
      mesh, gen_graphdef, gen_state = lay.mesh, lay.graphdef, lay.abstract()

    def compile_for(n: int):
      scfg = SamplingConfig(max_new_tokens=n, temperature=temperature, eos_ids=(), pad_id=0, num_samples=samples)
      with use_mesh(mesh):
        return generate_from_state.lower(gen_graphdef, gen_state, *self.args, scfg).compile(compiler_options)

    t0 = time.perf_counter()
    self.full = compile_for(new_tokens)
    if gen_state is not abs_state:
      self.copy = lay._copy.lower(abs_state).compile(compiler_options)
    self.compile_s = time.perf_counter() - t0
    self.one = compile_for(1)

  def init_state(self):
    return self.place(random_split("lm", self.cfg)[1])

  def place(self, state):
    import jax
    return jax.device_put(state, self.sharding)

  def __call__(self, state, one_token: bool = False):
    """Generates (synchronised) and returns the output; `one_token`: a single new token."""
    import jax
    if self.copy is not None:
      state = self.copy(state)
    out = (self.one if one_token else self.full)(state, *self.args)
    jax.block_until_ready(out.tokens)
    return out


def bench_sample_jax(cfg, batch: int, prompt: int, new_tokens: int, steps: int, temperature: float = 0.0,
                     devices: int | None = None, samples: int = 1) -> dict:
  """Times `SampleRun`: median of `steps` after a warm-up; a 1-token run separates the prefill from
  the per-token decode cost."""
  import jax
  import numpy as np
  run = SampleRun(cfg, batch, prompt, new_tokens, temperature, devices, samples=samples)
  rows = batch * samples
  state = run.init_state()
  out = run(state)
  assert int(np.min(np.asarray(out.lengths))) == new_tokens, "rows stopped early"
  total_s = statistics.median(times_of(lambda: run(state), steps))
  run(state, one_token=True)
  one_s = statistics.median(times_of(lambda: run(state, one_token=True), steps))
  decode_step_s = (total_s - one_s) / max(new_tokens - 1, 1)
  kind = jax.devices()[0].device_kind
  step_bytes = sample_step_bytes(cfg, rows, prompt + new_tokens / 2)
  bw = PEAK_BANDWIDTH.get(device_family(kind) or "")
  return {
      "device_kind": kind, "platform": jax.devices()[0].platform, "num_devices": run.num_devices,
      "knobs": {"dtype": cfg.dtype, "scan_layers": cfg.scan_layers, "attention": cfg.attention,
                "xla_flags": os.environ.get("XLA_FLAGS")},
      "samples_per_prompt": samples, "rows": rows,
      "compile_s": rounded(run.compile_s), "generate_s": rounded(total_s), "tokens_per_s": rounded(rows * new_tokens / total_s),
      "prefill_s": rounded(max(one_s - decode_step_s, 0.0)), "decode_step_s": rounded(decode_step_s),
      "decode_tokens_per_s": rounded(rows / decode_step_s) if decode_step_s > 0 else None,
      "decode_bytes_per_step": step_bytes, "peak_bandwidth": bw,
      "bandwidth_fraction": rounded(step_bytes / decode_step_s / bw) if bw and decode_step_s > 0 else None,
      "peak_rss_bytes": peak_rss_bytes(), "device_peak_bytes": device_peak_bytes(),
  }


