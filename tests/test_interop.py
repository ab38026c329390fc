"""Import of the authors' checkpoints, export to timm, round trips, safe loading, the command."""

import argparse
import functools
import logging
import pickle

import jax
import numpy as np
import pytest

from cim_jax.models import cim, heads as heads_lib

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from cim_jax import interop  # noqa: E402
from cim_jax.tools import convert  # noqa: E402
from cim_jax.train import loop  # noqa: E402

from torch_reference import (  # noqa: E402  pylint: disable=wrong-import-position
    CONTEXT, DEPTH, EXEMPLAR, HEADS, NUM, PATCH, WIDTH, authors_state_dict as _authors_state_dict,
    model as _model, torch_correlation_logits as _torch_correlation_logits)
from train_fixtures import read_checkpoint, tiny_config  # noqa: E402


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  corners = np.tile(np.array([[4, 4], [40, 4], [40, 30], [4, 30]], np.float32), (2, NUM, 1, 1))
  return {"context": rng.integers(0, 256, (2, CONTEXT, CONTEXT, 3), dtype=np.uint8),
          "exemplars": rng.integers(0, 256, (2, NUM, EXEMPLAR, EXEMPLAR, 3), dtype=np.uint8),
          "corners": corners}


# ----------------------------------------------------------------------------------------------
# Tests.

def test_imported_checkpoint_reproduces_authors_correlation_logits():
  model = _model()
  sd = _authors_state_dict(global_loss=True)  # heads present but unused: skipped
  params, target, state = interop.import_authors_state_dict(
      {k: v.numpy() for k, v in sd.items()}, model)
  assert state == {} and set(params) == {"encoder", "decoder"} and set(target) == {"encoder"}
  batch = _batch()
  _, aux = jax.jit(functools.partial(model.apply, train=False))(params, target, state, batch)
  to_torch = lambda x: torch.from_numpy(np.asarray(cim.normalize_images(x))).permute(0, 3, 1, 2)
  context = to_torch(batch["context"])
  exemplars = [to_torch(batch["exemplars"][:, n]) for n in range(NUM)]
  with torch.no_grad():
    expected = _torch_correlation_logits(sd, context, exemplars).numpy()
  np.testing.assert_allclose(aux["correlation_logits"], expected, atol=1e-5, rtol=0)
  # The target encoder really is blocks_c: the online blocks give different logits.
  sd_swapped = dict(sd, **{k.replace("_c", "", 1): v for k, v in sd.items() if "_c." in k})
  with torch.no_grad():
    other = _torch_correlation_logits(sd_swapped, context, exemplars).numpy()
  assert np.abs(other - expected).max() > 1e-2


def test_imported_global_heads_match_torch_build_mlp():
  model = _model(global_loss=True)
  sd = _authors_state_dict(global_loss=True, seed=3)
  params, target, state = interop.import_authors_state_dict(
      {k: v.numpy() for k, v in sd.items()}, model)
  x = np.random.default_rng(0).normal(size=(1, 5, WIDTH)).astype(np.float32)
  for prefix, head_params, head_state, dims in [
      ("decoder_g_embed", params["projector"], state["projector"], (WIDTH, 16, 16, 8)),
      ("decoder_g_embed_c", target["projector"], state["target_projector"], (WIDTH, 16, 16, 8)),
      ("decoder_predictor", params["predictor"], state["predictor"], (8, 16, 8))]:
    layers = []
    for i in range(len(dims) - 1):
      last = i == len(dims) - 2
      layers += [torch.nn.Linear(dims[i], dims[i + 1], bias=False),
                 torch.nn.BatchNorm1d(dims[i + 1], affine=not last)]
      layers += [] if last else [torch.nn.ReLU()]
    reference = torch.nn.Sequential(*layers).eval()
    reference.load_state_dict({k[len(prefix) + 1:]: v for k, v in sd.items()
                               if k.startswith(prefix + ".")}, strict=True)
    inputs = x[..., :dims[0]]
    ours = heads_lib.MLPHead(len(dims) - 1, 16, dims[-1]).apply(
        {"params": head_params, "batch_stats": head_state}, inputs, train=False)
    with torch.no_grad():
      expected = reference(torch.from_numpy(inputs[0])).numpy()
    np.testing.assert_allclose(ours[0], expected, atol=1e-5)


def test_export_import_round_trip_is_exact():
  model = _model(global_loss=True)
  params, state = jax.jit(model.init_variables)(jax.random.key(0))
  target = jax.tree.map(lambda x: x + 1.0, model.target_params_from(params))  # distinguishable
  target["encoder"]["cls_token"] = params["encoder"]["cls_token"]  # shared by construction
  state = jax.tree.map(lambda x: x + 0.5, state)
  exported = interop.export_authors_state_dict(params, target, state, model)
  assert set(exported) == set(_authors_state_dict(global_loss=True))
  back = interop.import_authors_state_dict(exported, model)
  for original, restored in zip((params, target, state), back):
    assert jax.tree.structure(original) == jax.tree.structure(restored)
    for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(restored)):
      np.testing.assert_array_equal(a, b)


def test_timm_export_loads_strictly_and_round_trips(tmp_path):
  model = _model()
  params = jax.jit(model.init)(jax.random.key(0))
  state = interop.encoder_to_timm(params["encoder"])
  reference = timm.models.vision_transformer.VisionTransformer(
      patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=0)
  reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  back = interop.encoder_from_timm(state, model.encoder)
  for a, b in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)
  interop.save_state_dict(state, str(tmp_path / "encoder.safetensors"))
  loaded = interop.load_torch_state_dict(str(tmp_path / "encoder.safetensors"))
  assert all(np.array_equal(loaded[k], state[k]) for k in state)


def test_mismatched_checkpoint_lists_every_problem():
  model = _model()
  sd = {k: v.numpy() for k, v in _authors_state_dict(global_loss=False).items()}
  del sd["blocks.1.mlp.fc1.bias"]
  sd["blocks.0.attn.qkv.weight"] = np.zeros((5, WIDTH), np.float32)
  sd["mask_token"] = np.zeros((1, 1, WIDTH), np.float32)
  sd["pos_embed"] = sd["pos_embed"] + 1.0
  with pytest.raises(ValueError) as error:
    interop.import_authors_state_dict(sd, model)
  message = str(error.value)
  for expected in ("missing key blocks.1.mlp.fc1.bias", "wrong shape for blocks.0.attn.qkv.weight",
                   "unexpected key mask_token", "pos_embed"):
    assert expected in message


def _save_like_release(state_dict, path, **extra):
  """torch.save of what the release's util/misc.py save_model writes: the model's state dict,
  an AdamW state after one step, the epoch, the (unused) loss scaler and the run's Namespace."""
  tensors = [v.clone().requires_grad_(True) for v in state_dict.values() if v.is_floating_point()]
  optimizer = torch.optim.AdamW(tensors, lr=1e-3, betas=(0.9, 0.95))
  for t in tensors:
    t.grad = torch.ones_like(t)
  optimizer.step()
  args = argparse.Namespace(gear="cim", model="vit_tiny_patch16", batch_size=256, accum_iter=2,
                            FP16=True, amp=False, clip_grad=1.0, lr=None, blr=1.5e-4,
                            output_dir="exps/cim", resume="", distributed=True, gpu=0,
                            dist_url="env://", **extra)
  torch.save({"model": state_dict, "optimizer": optimizer.state_dict(), "epoch": 299,
              "scaler": None, "args": args}, path)


def test_release_checkpoint_imports_safely(tmp_path, caplog):
  """A file written like the release's save_model: plain weights_only loading refuses it (the
  Namespace), our loader reads it, ignores the resume state with one log line, and the imported
  model reproduces the authors' correlation logits."""
  sd = _authors_state_dict(global_loss=True, seed=5)
  path = str(tmp_path / "checkpoint-299.pth")
  _save_like_release(sd, path)
  with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
    torch.load(path, map_location="cpu", weights_only=True)
  with caplog.at_level(logging.INFO):
    loaded = interop.load_torch_state_dict(path)
  lines = [r.getMessage() for r in caplog.records if "resume state" in r.getMessage()]
  assert len(lines) == 1 and "optimizer, epoch, scaler, args" in lines[0]
  assert set(loaded) == set(sd)
  model = _model()
  params, target, state = interop.import_authors_state_dict(loaded, model)
  batch = _batch(seed=2)
  _, aux = jax.jit(functools.partial(model.apply, train=False))(params, target, state, batch)
  to_torch = lambda x: torch.from_numpy(np.asarray(cim.normalize_images(x))).permute(0, 3, 1, 2)
  with torch.no_grad():
    expected = _torch_correlation_logits(
        sd, to_torch(batch["context"]),
        [to_torch(batch["exemplars"][:, n]) for n in range(NUM)]).numpy()
  np.testing.assert_allclose(aux["correlation_logits"], expected, atol=1e-5, rtol=0)


class _Exploit:
  def __reduce__(self):
    return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_loader_never_runs_pickled_code(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  path = tmp_path / "evil.pth"
  torch.save({"model": {"cls_token": torch.zeros(1)}, "extra": _Exploit()}, path,
             pickle_protocol=pickle.DEFAULT_PROTOCOL)
  assert not (tmp_path / "PWNED").exists()
  with pytest.raises(pickle.UnpicklingError):
    interop.load_torch_state_dict(str(path))
  assert not (tmp_path / "PWNED").exists()
  # Allowing the release's Namespace opens nothing inside it: code hidden in args is refused too,
  # and the command says so in one line (exit status 2).
  hidden = str(tmp_path / "evil_args.pth")
  _save_like_release({"cls_token": torch.zeros(1)}, hidden, note=_Exploit())
  with pytest.raises(pickle.UnpicklingError):
    interop.load_torch_state_dict(hidden)
  with pytest.raises(SystemExit) as exit_info:
    convert.main(["import", "--variant", "Ti/16", "--checkpoint", hidden,
                  "--output", str(tmp_path / "out.msgpack")])
  assert exit_info.value.code == 2
  message = capsys.readouterr().err
  assert message.startswith("error: ") and message.count("\n") == 1 and "unpickle exec " in message
  assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out.msgpack").exists()


def test_command_import_then_export_to_timm(tmp_path):
  """Ti/16 with the default decoder: a release-format .pth -> msgpack -> timm safetensors -> timm."""
  model = convert._build_model("Ti/16", False, 160, 64)
  params, state = jax.jit(model.init_variables)(jax.random.key(0))
  target = jax.tree.map(lambda x: x * 0.5, model.target_params_from(params))
  target["encoder"]["cls_token"] = params["encoder"]["cls_token"]
  sd = interop.export_authors_state_dict(params, target, state, model)
  _save_like_release({k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                     str(tmp_path / "cim.pth"))
  convert.main(["import", "--variant", "Ti/16", "--checkpoint", str(tmp_path / "cim.pth"),
                "--output", str(tmp_path / "cim.msgpack")])
  convert.main(["export", "--variant", "Ti/16", "--params", str(tmp_path / "cim.msgpack"),
                "--which", "target", "--output", str(tmp_path / "target.safetensors")])
  from safetensors.torch import load_file
  reference = timm.create_model(interop.timm_model_name("Ti/16"), pretrained=False, num_classes=0)
  reference.load_state_dict(load_file(str(tmp_path / "target.safetensors")), strict=True)
  np.testing.assert_array_equal(reference.blocks[3].mlp.fc2.weight.detach().numpy(),
                                np.asarray(target["encoder"]["blocks_3"]["mlp"]["fc2"]["kernel"]).T)


@pytest.mark.slow
def test_command_exports_a_training_run(tmp_path):
  """A (tiny) pre-training work dir of this project -> timm safetensors, target encoder."""
  config = tiny_config(num_train_steps=2)
  workdir = str(tmp_path / "run")
  loop.train(config, workdir)
  output = str(tmp_path / "target.safetensors")
  convert.main(["export", "--workdir", workdir, "--variant", config.model.variant, "--which",
                "target", "--output", output])
  fields = interop.vit_lib.decode_variant(config.model.variant)
  reference = timm.models.vision_transformer.VisionTransformer(
      patch_size=fields["patch_size"], embed_dim=fields["width"], depth=fields["depth"],
      num_heads=fields["num_heads"], num_classes=0)
  from safetensors.torch import load_file
  reference.load_state_dict(load_file(output), strict=True)
  saved = read_checkpoint(workdir)
  np.testing.assert_array_equal(reference.norm.weight.detach().numpy(),
                                saved["target_params"]["encoder"]["norm"]["scale"])
