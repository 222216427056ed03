"""`hs2p convert`: Hugging Face directory or GGUF file -> model checkpoint, and checkpoint -> Hugging Face."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from hs2p_jax import storage
from hs2p_jax.errors import UserError


def convert_command(args) -> int:
  """Import (`--hf`, `--gguf` -> `--out`) or export (`--checkpoint` -> `--to-hf`), on every process of
  the run, the model sharded over the mesh (default: FSDP over every device)."""
  from hs2p_jax.checkpoint import load_model, tokenizer_dir
  from hs2p_jax.config import load_tool
  from hs2p_jax.convert import export_hf
  from hs2p_jax.distributed import initialize
  from hs2p_jax.sharding import make_mesh, rules_from

  cfg = load_tool("convert", ["mesh.data=1", "mesh.fsdp=-1", *args.overrides], {"template": "steerlm"},
                  data_keys=("template",))
  if args.dtype and not args.checkpoint:
    raise UserError("convert --dtype applies to the export (--checkpoint ... --to-hf DIR); "
                    "an import keeps float32 parameters (--set model.dtype=... sets the compute dtype)")
  initialize(cfg.dist.coordinator, cfg.dist.num_processes, cfg.dist.process_id, cfg.dist.local_device_ids,
             cfg.dist.heartbeat_timeout)
  mesh, rules = make_mesh(cfg.mesh), rules_from(cfg.mesh.rules)
  if not args.checkpoint:
    if args.reward:
      raise UserError("convert --reward applies to the export (--checkpoint ... --to-hf DIR)")
    return _import(args, cfg, mesh, rules)
  if not args.to_hf:
    raise UserError("convert --checkpoint needs --to-hf DIR")
  model, meta = load_model(args.checkpoint, mesh, rules)
  if (args.adapter or args.merge) and not meta.config.lora_rank:
    raise UserError(f"convert --{'adapter' if args.adapter else 'merge'}: {args.checkpoint} has no LoRA adapters")
  if meta.config.lora_rank and not (args.adapter or args.merge):
    raise UserError(f"convert: {args.checkpoint} has LoRA adapters: export them (--adapter, PEFT's format) "
                    "or the merged model (--merge)")
  if args.adapter:
    return _export_adapter(args, model, meta)
  if args.merge:
    from hs2p_jax.model import merge_lora
    model = merge_lora(model)
  dtype = args.dtype or meta.config.dtype  # a bfloat16-trained run exports bfloat16
  reward = None
  if args.reward:
    from hs2p_jax.model.reward import reward_weights_from_spec
    if meta.kind != "reward":
      raise UserError(f"convert --reward: {args.checkpoint} is a {meta.kind} checkpoint, not a reward model")
    reward = reward_weights_from_spec(args.reward, meta.num_attributes)
  tok_dir = tokenizer_dir(args.checkpoint)
  if storage.is_url(args.to_hf):  # Hugging Face's layout is files in a directory: made here, then uploaded
    import jax
    with tempfile.TemporaryDirectory(prefix="hs2p-export-") as tmp:
      export_hf(model, os.path.join(tmp, "hf"), tokenizer_dir=tok_dir, dtype=dtype, reward=reward)
      if jax.process_index() == 0:
        storage.rmtree(args.to_hf)
        storage.upload_dir(os.path.join(tmp, "hf"), args.to_hf)
  else:
    export_hf(model, args.to_hf, tokenizer_dir=tok_dir, dtype=dtype, reward=reward)
  report = {"exported": storage.absolute(args.to_hf), "dtype": dtype}
  if reward is not None:
    report["num_labels"] = 1
  print(json.dumps(report))
  return 0


def _export_adapter(args, model, meta) -> int:
  """`--adapter`: the checkpoint's adapters (and reward head) as a PEFT directory."""
  from hs2p_jax.convert.peft import export_adapter
  if args.reward or args.dtype:
    raise UserError("convert --adapter writes float32 adapters and the head as trained (no --reward, --dtype)")
  if storage.is_url(args.to_hf):
    raise UserError("convert --adapter: write the adapter to a local directory")
  source = meta.source  # PEFT's base_model_name_or_path: the model.source the adapters trained over
  export_adapter(model, args.to_hf, base=source[3:] if source and source.startswith("hf:") else source)
  print(json.dumps({"exported": storage.absolute(args.to_hf), "adapter": "peft-lora",
                    "rank": model.cfg.lora_rank}))
  return 0


def _import(args, cfg, mesh, rules) -> int:
  """`--hf` / `--gguf` -> a model checkpoint at `--out`, each process reading the regions its devices hold."""
  from hs2p_jax.checkpoint import ModelMeta, save_model
  from hs2p_jax.convert import load_gguf, load_hf
  from hs2p_jax.tokenizer import load_tokenizer

  if not args.out:
    raise UserError("convert --hf/--gguf needs --out CKPT")
  if args.hf:
    model = load_hf(args.hf, head=args.head, num_attributes=args.num_attributes, mesh=mesh, rules=rules)
    tokenizer = load_tokenizer(args.hf) if _has_tokenizer(args.hf) else None
  else:
    model = load_gguf(args.gguf, head=args.head, num_attributes=args.num_attributes or 9, mesh=mesh, rules=rules)
    tokenizer = load_tokenizer("gguf:" + args.gguf)
  runtime = cfg.model.fields()
  meta = ModelMeta(kind=args.head, config=model.cfg.replace(**runtime) if runtime else model.cfg,
                   num_attributes=getattr(model, "num_attributes", args.num_attributes or 9), template=cfg.data.template)
  save_model(args.out, model, meta, tokenizer, overwrite=True)
  report = {"checkpoint": storage.absolute(args.out), "kind": args.head, "params": int(model.cfg.num_params()),
            "layers": model.cfg.num_layers}
  if args.score:
    report["score"] = score_pair(args.out, *args.score)
  print(json.dumps(report))
  return 0


def _has_tokenizer(path: str) -> bool:
  return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def score_pair(checkpoint: str, prompt: str, response: str) -> dict:
  """Reward-head outputs for one prompt/response in the checkpoint's template; an LM checkpoint gets a fresh head."""
  from hs2p_jax.checkpoint import load_checkpoint_tokenizer, load_model
  from hs2p_jax.data.encode import encode
  from hs2p_jax.data.examples import NUM_LABELS, RatingExample
  from hs2p_jax.model.reward import ATTRIBUTES
  from hs2p_jax.train.model_init import as_reward_model

  model, meta = load_model(checkpoint)
  if meta.kind != "reward":
    model = as_reward_model(model, 9, seed=0)
  tok = load_checkpoint_tokenizer(checkpoint)
  zeros = np.zeros(NUM_LABELS, np.float32)
  example = RatingExample(prompt, response, zeros, zeros.astype(bool), "--score")
  enc = encode([example], tok, meta.template, meta.config.max_position_embeddings)  # as training tokenizes it
  ids = np.asarray([enc.seqs[0][0]], np.int32)
  out = np.asarray(model(ids, np.ones_like(ids)))[0]
  names = ATTRIBUTES if len(out) == len(ATTRIBUTES) else [f"out_{i}" for i in range(len(out))]
  return {n: round(float(v), 5) for n, v in zip(names, out)}
