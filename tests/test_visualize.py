"""Pretext IoU against hand computations; correlation PNG and training-curve plots."""

import json

import numpy as np
import pytest
from PIL import Image

from cim_jax.evaluate import pretext
from cim_jax.evaluate import visualize
from train_fixtures import recipe


def test_pretext_iou_hand_computed():
  true = np.zeros((1, 2, 4, 4), bool)
  pred = np.zeros((1, 2, 4, 4), bool)
  true[0, 0, :2, :2] = True   # 4 pixels
  pred[0, 0, :2, :3] = True   # 6 pixels, 4 shared -> IoU 4/6
  true[0, 1, 3, 3] = True     # 1 pixel
  pred[0, 1, 0, 0] = True     # disjoint -> IoU 0
  assert pretext.pretext_iou(pred, true) == pytest.approx((4 / 6 + 0) / 2)


def test_pretext_iou_takes_argmax_of_logits():
  true = np.zeros((2, 1, 3, 3), np.uint8)
  true[0, 0, 0] = 1  # top row
  true[1, 0, :, 0] = 1  # left column
  logits = np.zeros((2, 1, 3, 3, 2), np.float32)
  logits[..., 0] = 1.0
  logits[0, 0, 0, :, 1] = 2.0      # predicts exactly the top row: IoU 1
  logits[1, 0, :2, 0, 1] = 2.0     # predicts 2 of the 3 left pixels: IoU 2/3
  assert pretext.pretext_iou(logits, true) == pytest.approx((1 + 2 / 3) / 2)


def test_empty_masks_agree_and_shapes_are_checked():
  empty = np.zeros((1, 1, 5, 5), bool)
  assert pretext.pretext_iou(empty, empty) == 1.0
  with pytest.raises(ValueError, match="differ in shape"):
    pretext.pretext_iou(np.zeros((1, 2, 5, 5), bool), empty)


def test_correlation_probs_is_two_class_softmax():
  logits = np.array([[0.0, 0.0], [0.0, np.log(3.0)]])
  np.testing.assert_allclose(pretext.correlation_probs(logits), [0.5, 0.75])


def _pairs(batch=2, num=3, size=32, ex=8):
  rng = np.random.default_rng(0)
  context = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  exemplars = rng.integers(0, 256, (batch, num, ex, ex, 3), dtype=np.uint8)
  masks = np.zeros((batch, num, size, size), bool)
  masks[:, :, 8:20, 4:16] = True
  return context, exemplars, masks


def test_save_correlation_png_draws_every_panel(tmp_path):
  context, exemplars, masks = _pairs()
  probs = masks.astype(np.float64)
  path = visualize.save_correlation_png(str(tmp_path / "c.png"), context, exemplars, masks,
                                        probs, tile=32, title="t")
  image = np.asarray(Image.open(path).convert("RGB"))
  # 2 samples x 3 rows of tiles + captions, 1 + 3 columns of tiles after the label margin.
  assert image.shape[1] == 92 + 4 * (32 + 4)
  assert image.shape[0] == 30 + 2 * (3 * (32 + 16) + 2 * 4)
  # The ground-truth tile of sample 0, exemplar 0 is tinted green inside the mask.
  gt_tile = image[30 + 48:30 + 48 + 32, 92 + 36:92 + 36 + 32].astype(int)
  inside = gt_tile[10:18, 6:14]
  assert (inside[..., 1] > inside[..., 0]).mean() > 0.9
  # Prediction tiles are bright (heat map near p=1) inside the mask, dark outside.
  pred_tile = image[30 + 96:30 + 96 + 32, 92 + 36:92 + 36 + 32].astype(int)
  assert pred_tile[11:17, 7:13].mean() > pred_tile[24:, 20:].mean() + 40


def test_save_correlation_png_rejects_mismatched_shapes(tmp_path):
  context, exemplars, masks = _pairs()
  with pytest.raises(ValueError, match="disagree"):
    visualize.save_correlation_png(str(tmp_path / "c.png"), context, exemplars, masks,
                                   masks[:, :2].astype(float))


def test_plot_training_curves_one_panel_per_metric(tmp_path):
  log = tmp_path / "metrics.jsonl"
  with open(log, "w") as f:
    for step in range(0, 100, 10):
      loss = 1.0 / (1 + step)  # corr_loss repeats the total: drawn once
      f.write(json.dumps({"step": step, "loss": loss, "corr_loss": loss, "lr": step * 1e-5,
                          "note": "x"}) + "\n")
    f.write("\n")
  png = visualize.plot_training_curves(str(log), str(tmp_path / "curves.png"), panel_height=150)
  image = np.asarray(Image.open(png).convert("RGB"))
  assert image.shape == (2 * 150, 720, 3)  # loss and lr panels
  line_blue = (np.abs(image.astype(int) - [31, 119, 180]).sum(-1) < 30)
  assert line_blue[:150].sum() > 100 and line_blue[150:].sum() > 100


def test_plot_training_curves_bad_log(tmp_path):
  log = tmp_path / "metrics.jsonl"
  log.write_text('{"step": 1, "loss": 2.0}\nnot json\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2 is not JSON"):
    visualize.plot_training_curves(str(log), str(tmp_path / "c.png"))
  log.write_text('{"step": 1, "accuracy": 2.0}\n')
  with pytest.raises(ValueError, match="no loss or learning-rate"):
    visualize.plot_training_curves(str(log), str(tmp_path / "c.png"))


def test_evaluate_pretext_matches_model_logits(tmp_path):
  import jax
  from cim_jax import geometry
  from cim_jax.models import cim
  model_cfg = recipe().model
  model_cfg.decoder_dim, model_cfg.decoder_heads = 64, 4
  data_cfg = recipe().data
  data_cfg.context_size, data_cfg.exemplar_size, data_cfg.num_exemplars = 32, 16, 2
  model = cim.build_model(model_cfg, data_cfg)
  model.encoder = model.encoder.clone(depth=1)  # a one-block encoder keeps the test fast
  params, target_params, model_state = pretext.random_init_params(model, seed=0)
  rng = np.random.default_rng(0)
  corners = np.array([[2, 3], [20, 3], [20, 25], [2, 25]], np.float32)
  batch = {"context": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
           "exemplars": rng.integers(0, 256, (3, 2, 16, 16, 3), dtype=np.uint8),
           "corners": np.broadcast_to(corners, (3, 2, 4, 2)).copy()}
  result = visualize.evaluate_pretext(model, params, target_params, model_state, batch,
                                    png=str(tmp_path / "p.png"), batch_size=2)  # 2 chunks
  logits = jax.jit(lambda b: model.apply(params, target_params, model_state, b, train=False)[1][
      "correlation_logits"])(batch)
  masks = geometry.masks_from_corners(batch["corners"], 32)
  assert masks[0, 0].sum() == 18 * 22
  expected = pretext.pretext_iou(np.asarray(logits), masks)
  assert result["pretext_iou"] == pytest.approx(expected, abs=1e-6)
  assert Image.open(result["png"]).size[0] > 0
  assert jax.tree.structure(target_params) == jax.tree.structure({"encoder": params["encoder"]})
