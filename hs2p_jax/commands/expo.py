"""`hs2p expo`: ExPO with a fixed factor, or the factor searched on validation pairs (with a plot)."""

from __future__ import annotations

import dataclasses
import io
import json
import sys

import jax
from flax import nnx

from hs2p_jax import storage
from hs2p_jax.errors import UserError


def load_pair(base: str, tuned: str, mesh=None, rules=None, runtime: dict | None = None):
  """(graphdef, base params, tuned params, tuned meta, tokenizer) after checking they match; the
  params are loaded onto `mesh` (sharded by `rules`), one copy of each. A LoRA tuned model stays
  one (`at_adapter_start`); the base's own adapters, if any, are merged in."""
  from hs2p_jax.checkpoint import load_checkpoint_tokenizer, load_model, read_meta
  from hs2p_jax.sharding import DEFAULT_RULES
  base_meta, tuned_meta = read_meta(base), read_meta(tuned)
  if (base_meta.kind, base_meta.num_attributes) != (tuned_meta.kind, tuned_meta.num_attributes) or \
      _shape_fields(base_meta.config) != _shape_fields(tuned_meta.config):
    raise UserError(f"expo: {base} and {tuned} are different architectures")
  rules = rules or DEFAULT_RULES
  from hs2p_jax.model import merge_lora
  base_model, _ = load_model(base, mesh, rules, **(runtime or {}))
  tuned_model, tuned_meta = load_model(tuned, mesh, rules, **(runtime or {}))
  base_model = merge_lora(base_model)
  if tuned_model.cfg.lora_rank:
    base_model = at_adapter_start(tuned_model, base_model)
  tuned_meta = dataclasses.replace(tuned_meta, config=tuned_model.cfg, base=None)  # its base is extrapolated too: saved whole
  graphdef, base_params = nnx.split(base_model)
  _, tuned_params = nnx.split(tuned_model)
  return graphdef, base_params, tuned_params, tuned_meta, load_checkpoint_tokenizer(tuned)


def at_adapter_start(tuned: nnx.Module, base: nnx.Module) -> nnx.Module:
  """`base` (no adapters) in the structure of the LoRA model `tuned`: its weights, with tuned's A and
  a zero B. Then `extrapolate(base, tuned, f)` keeps A and scales B by f, so the result is a LoRA
  model (its adapters export as they are) computing exactly what ExPO on the merged weights gives:
  W_b + f·(W_t + s·A·B - W_b) = [W_b + f·(W_t - W_b)] + s·A·(f·B), the head extrapolated with them."""
  from hs2p_jax.model.lora import SUFFIX_B
  graphdef, state = nnx.split(tuned)
  flat = dict(nnx.to_flat_state(state))
  for path, var in nnx.to_flat_state(nnx.state(base)):
    flat[path] = var
  for path, var in list(flat.items()):
    if str(path[-1]).endswith(SUFFIX_B):
      flat[path] = var.replace(jax.numpy.zeros_like(var.get_value()))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _shape_fields(cfg) -> tuple:
  d = dataclasses.asdict(cfg)
  return tuple(d[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                              "num_kv_heads", "head_dim", "tie_word_embeddings"))


def plot_search(table: list[dict], best: float) -> bytes:
  """PNG of validation accuracy and BT loss against the factor."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  f = [r["factor"] for r in table]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(f, [r["accuracy"] for r in table], "o-", color="C0", label="pairwise accuracy")
  ax.set_xlabel("factor: base + factor * (tuned - base)")
  ax.set_ylabel("accuracy", color="C0")
  ax.axvline(best, color="gray", ls="--", lw=1)
  ax2 = ax.twinx()
  ax2.plot(f, [r["loss"] for r in table], "s--", color="C1", label="BT loss")
  ax2.set_ylabel("BT loss (regular)", color="C1")
  ax.set_title(f"ExPO search (best factor {best:g})")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  return buf.getvalue()


def run_expo(base: str, tuned: str, out: str, factor: float | None = None, search: str | None = None,
             data: str | None = None, fmt: str = "helpsteer2-preference", split: str = "validation",
             batch_size: int = 8, max_length: int | None = None, cache_dir: str | None = None,
             data_keys: dict | None = None, mesh=None, rules=None, runtime: dict | None = None) -> dict:
  """Writes the extrapolated checkpoint to `out`; returns {"factor", "table"?, "origin"?}.

  Base and tuned are loaded once onto `mesh`; the search scores each factor's mix with those
  params (a scorer over the tuned model's graph, no copy of its own), and the final mix is computed
  shard by shard into the tuned params' buffers (donated)."""
  from hs2p_jax.checkpoint import save_model
  from hs2p_jax.commands.evaluate import PairScorer, say_devices, say_truncated
  from hs2p_jax.eval.scoring import pair_metrics
  from hs2p_jax.expo import extrapolate, factor_grid, search_factor
  from hs2p_jax.sharding import DEFAULT_RULES, use_mesh

  rules = rules or DEFAULT_RULES
  grid = None
  if factor is None:
    if not data:
      raise UserError("expo --search needs --data (the pairs to score factors on)")
    try:
      grid = factor_grid(search)
    except ValueError as e:
      raise UserError(str(e)) from None
  graphdef, base_params, tuned_params, meta, tokenizer = load_pair(base, tuned, mesh, rules, runtime)
  say_devices(mesh)
  if max_length is None:
    from hs2p_jax.commands.evaluate import scoring_length
    max_length = scoring_length("expo", tuned, None)
  shardings = jax.tree.map(lambda a: a.sharding, tuned_params)
  mix = jax.jit(extrapolate, out_shardings=shardings)
  extra, result = {}, {}
  if grid is not None:
    scorer = PairScorer(graphdef, tuned_params, meta, tokenizer, mesh, rules, batch_size=batch_size,
                        max_length=max_length)
    loader = scorer.loader(scorer.data_config(data, fmt, **(data_keys or {})), split=split, cache_dir=cache_dir)
    say_truncated("pairs", loader.report.truncated, loader.report.kept, scorer.max_length)
    done = []

    def score(f):
      with use_mesh(mesh, rules):
        params = mix(base_params, tuned_params, f)
      rewards, _, _ = scorer.rewards(loader, params)
      del params
      m = pair_metrics(rewards)
      done.append(f)
      print(f"expo factor {f:g} ({len(done)} of {len(grid)}): accuracy {m['accuracy']:.4f} loss {m['loss']:.4f}",
            file=sys.stderr, flush=True)
      return m["accuracy"], m["loss"]

    factor, table = search_factor(score, grid)
    result["table"] = table
    result["origin"] = loader.report.origin
    extra["expo_search.json"] = json.dumps({"best": factor, "table": table, "data": data,
                                            "origin": loader.report.origin}, indent=2).encode()
    extra["expo_search.png"] = plot_search(table, factor)
  with use_mesh(mesh, rules):
    params = jax.jit(extrapolate, out_shardings=shardings, donate_argnums=(1,))(base_params, tuned_params, factor)
  extra["expo.json"] = json.dumps({"base": storage.absolute(base), "tuned": storage.absolute(tuned),
                                   "factor": factor, "formula": "base + factor * (tuned - base)"}).encode()
  save_model(out, nnx.merge(graphdef, params), meta, tokenizer, overwrite=True, extra_files=extra)
  result["factor"] = factor
  return result


def expo_command(args) -> int:
  from hs2p_jax.commands.evaluate import PAIR_DATA_KEYS, data_cache, tool_config
  cfg, mesh, rules = tool_config("expo", args.tuned, args.overrides, args.data, args.format, args.max_length)
  given = {k: getattr(cfg.data, k) for k in PAIR_DATA_KEYS}
  res = run_expo(args.base, args.tuned, args.out, factor=args.factor, search=args.search, data=args.data,
                 fmt=args.format, split=args.split, batch_size=args.batch_size, max_length=cfg.data.max_length,
                 cache_dir=data_cache(),
                 data_keys=given, mesh=mesh, rules=rules, runtime=cfg.model.fields())
  print(json.dumps({"factor": res["factor"], "out": storage.absolute(args.out)}))
  return 0
