"""Tests of uccl_jax.step: optimizer, loss composition, methods, sharding, accumulation.

Most tests drive the step with `TinySegmenter`, a few-layer network that keeps
DeepLabV3Plus's contract (output dict, BatchNorm statistics, feature
perturbation from the 'dropout' rng, params['backbone']) but compiles in
seconds: the step's logic does not depend on the network's depth. The real
DeepLabV3Plus goes through the step at full size under jax.eval_shape (shapes
and dtypes; the end-to-end training tests run it for real). The sharded versus
one-device check lives in test_parallel.py.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uccl_jax import config as config_lib
from uccl_jax import inputs
from uccl_jax import losses
from uccl_jax import parallel
from uccl_jax import step
from uccl_jax.data import transforms

NUM_CLASSES = 3
CROP = 33
BATCH = 4


class TinySegmenter(nn.Module):
  """Two strided conv+BN layers ('backbone'), a small decoder and a classifier."""
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, images, train=False, feature_perturbation=False):
    batch, height, width = images.shape[:3]

    class Backbone(nn.Module):

      @nn.compact
      def __call__(self, x, train):
        c1 = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(
            nn.Conv(8, (3, 3), strides=2, padding=1, use_bias=False)(x)))
        c4 = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(
            nn.Conv(16, (3, 3), strides=2, padding=1, use_bias=False)(c1)))
        return c1, c4

    c1, c4 = Backbone(name='backbone')(images, train)
    if feature_perturbation:
      drop = nn.Dropout(0.5, broadcast_dims=(1, 2), deterministic=False)
      c1 = jnp.concatenate([c1, drop(c1)])
      c4 = jnp.concatenate([c4, drop(c4)])
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name='aspp_bn')(
        nn.Conv(8, (1, 1), use_bias=False, name='aspp')(c4)))
    x = jax.image.resize(x, x.shape[:1] + c1.shape[1:3] + x.shape[3:], 'bilinear')
    x = jnp.concatenate([c1, x], axis=-1)
    features = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name='fuse_bn')(
        nn.Conv(8, (3, 3), padding=1, use_bias=False, name='fuse')(x)))
    lowres = nn.Conv(self.num_classes, (1, 1), name='classifier')(features)
    logits = jax.image.resize(lowres, lowres.shape[:1] + (height, width, self.num_classes),
                              'bilinear')
    out = {'logits': logits[:batch], 'logits_lowres': lowres[:batch],
           'features': features[:batch]}
    if feature_perturbation:
      out['logits_fp'] = logits[batch:]
    return out


def make_config(method='uccl', **train):
  config = config_lib.base_config()
  config.method = method
  config.model.backbone = 'resnet18'
  config.model.width = 8
  config.model.head_channels = 16
  config.data.crop_size = CROP
  config.data.num_classes = NUM_CLASSES
  config.train.batch_size = BATCH
  # Thresholds inside the range of an untrained 3-class network's confidences,
  # so that confident and uncertain pixels both occur (checked by the tests).
  config.unsup.conf_thresh = 0.45
  config.sbu.threshold = 0.55
  for name, value in train.items():
    config.train[name] = value
  return config


def make_batch(seed=0, batch=BATCH, size=CROP):
  """A host batch in the pipeline's layout (uccl_jax.inputs): padding on the right, CutMix boxes,
  strong-view parameters drawn by the pipeline's own function, ignored label pixels.

  Not `uccl_jax.benchmark.random_inputs.random_batch`, although the layout is the same: the
  numerical checks here and in test_parallel.py / test_recipes.py (gradients and parameter updates
  equal to 1e-4 across meshes) have their tolerances set on these values; the benchmark's draws
  (seeds 10, 11) put the sharded-versus-one-device update check of test_parallel.py over them."""
  rng = np.random.default_rng(seed)

  def images():
    return rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)

  def boxes():
    box = np.zeros((batch, 4), np.int32)
    for i in range(batch):
      y, x = rng.integers(0, size - 12, 2)
      box[i] = (y, x, 12, 14)
    return box

  def valid():
    return np.array([(0, 0, size, size - rng.integers(1, 9)) for _ in range(batch)], np.int32)

  def strong():
    return np.stack([transforms.draw_strong_params(rng) for _ in range(batch)])

  def unlabeled(with_boxes=True):
    views = dict(weak=images(), strong1=strong(), strong2=strong(), valid=valid())
    if with_boxes:
      views.update(box1=boxes(), box2=boxes())
    return views

  mask = rng.integers(0, NUM_CLASSES, (batch, size, size)).astype(np.uint8)
  mask[:, :4] = 255
  return dict(labeled=dict(image=images(), mask=mask), unlabeled=unlabeled(),
              mix=unlabeled(with_boxes=False))


def dense_batch(batch):
  """The step's view of a host batch (uccl_jax.inputs.expand), as NumPy, for the references."""
  return jax.tree.map(np.asarray, jax.jit(inputs.expand)(batch))


def init_state(config, model=None, total_steps=100, mesh=None):
  model = model or TinySegmenter()
  return model, step.create_train_state(config, model, jax.random.PRNGKey(0), (CROP, CROP, 3),
                                        total_steps=total_steps, mesh=mesh)


def run_steps(config, batches, devices, model=None):
  """Runs the jitted, sharded step on a mesh of `devices`; returns (state, [metrics])."""
  mesh = parallel.make_mesh(devices)
  model, state = init_state(config, model, mesh=mesh)
  train_step = step.make_train_step(model, config, mesh)
  history = []
  for batch in batches:
    state, metrics = train_step(state, parallel.global_batch(batch, mesh))
    history.append({k: float(v) for k, v in metrics.items()})
  return jax.device_get(state), history


def rel_close(a, b, rtol):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.max(np.abs(b)), 1e-12)
  return np.max(np.abs(a - b)) / scale <= rtol


# ---------------------------------------------------------------------------
# Optimizer


def test_optimizer_matches_torch_sgd():
  torch = pytest.importorskip('torch')
  config = make_config(lr=0.05, lr_multi=10.0, weight_decay=1e-2, momentum=0.9)
  total = 7
  rng = np.random.default_rng(0)
  params = {'backbone': {'conv': rng.normal(size=(3, 4)).astype(np.float32)},
            'head': {'w': rng.normal(size=(5,)).astype(np.float32)},
            'classifier': {'b': rng.normal(size=(2,)).astype(np.float32)}}
  tx = step.make_optimizer(config, total)
  opt_state = tx.init(params)
  jax_params = jax.tree.map(jnp.asarray, params)

  torch_backbone = [torch.tensor(params['backbone']['conv'], requires_grad=True)]
  torch_head = [torch.tensor(params['head']['w'], requires_grad=True),
                torch.tensor(params['classifier']['b'], requires_grad=True)]
  sgd = torch.optim.SGD([{'params': torch_backbone, 'lr': 0.05},
                         {'params': torch_head, 'lr': 0.05 * 10.0}],
                        lr=0.05, momentum=0.9, weight_decay=1e-2)
  for s in range(5):
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    # The poly rate for update s, set before the update (step counted from 0).
    lr = 0.05 * (1 - s / total) ** 0.9
    sgd.param_groups[0]['lr'] = lr
    sgd.param_groups[1]['lr'] = lr * 10.0
    for tensor, g in zip(torch_backbone + torch_head,
                         [grads['backbone']['conv'], grads['head']['w'], grads['classifier']['b']]):
      tensor.grad = torch.tensor(g)
    sgd.step()
    updates, opt_state = tx.update(jax.tree.map(jnp.asarray, grads), opt_state, jax_params)
    jax_params = jax.tree.map(lambda p, u: p + u, jax_params, updates)
    assert float(step.learning_rate_schedule(config, total)(s)) == pytest.approx(lr, rel=1e-6)

  np.testing.assert_allclose(jax_params['backbone']['conv'], torch_backbone[0].detach().numpy(),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax_params['head']['w'], torch_head[0].detach().numpy(),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax_params['classifier']['b'], torch_head[1].detach().numpy(),
                             rtol=1e-5, atol=1e-6)


def test_states_from_separate_calls_share_static_fields():
  # A checkpoint target from eval_shape and a fresh state must match the same
  # compiled step: equal tree structures, optimizer and schedule included.
  config = make_config()
  model = TinySegmenter()
  create = functools.partial(step.create_train_state, config, model,
                             image_shape=(CROP, CROP, 3), total_steps=50)
  abstract = jax.eval_shape(create, jax.random.PRNGKey(1))
  assert jax.tree.structure(abstract) == jax.tree.structure(
      jax.eval_shape(create, jax.random.PRNGKey(2)))
  other = make_config(lr=0.5)
  assert step.make_optimizer(other, 50) is not step.make_optimizer(config, 50)


def test_optimizer_needs_backbone_subtree():
  tx = step.make_optimizer(make_config(), 10)
  with pytest.raises(step.StepConfigError, match='backbone'):
    tx.init({'encoder': {'w': jnp.zeros(2)}})


# ---------------------------------------------------------------------------
# Feature-resolution ignore mask


def test_nearest_align_corners_matches_loop():
  rng = np.random.default_rng(1)
  mask = rng.integers(0, 2, (2, 33, 20)).astype(np.int32)
  for size in [(17, 7), (9, 20), (1, 3), (33, 20)]:
    got = np.asarray(step.nearest_align_corners(jnp.asarray(mask), size))
    want = np.zeros((2,) + size, np.int32)
    for i in range(size[0]):
      # Position of output pixel i on the input's align-corners grid, nearest pixel (ties up).
      src_i = 0 if size[0] == 1 else int(np.floor(i * (33 - 1) / (size[0] - 1) + 0.5))
      for j in range(size[1]):
        src_j = 0 if size[1] == 1 else int(np.floor(j * (20 - 1) / (size[1] - 1) + 0.5))
        want[:, i, j] = mask[:, src_i, src_j]
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------
# The loss composition, written out in the test


def paste(box, inside, outside):
  sel = box == 1
  return np.where(sel.reshape(sel.shape + (1,) * (outside.ndim - sel.ndim)), inside, outside)


def teacher_prediction(state, batch, model):
  """Confidence and class of the mixing batch under inference-mode BN (NumPy, float64)."""
  teacher = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                        batch['mix']['weak'], train=False)['logits']
  teacher = np.asarray(teacher, np.float64)
  teacher_prob = np.exp(teacher - teacher.max(-1, keepdims=True))
  teacher_prob /= teacher_prob.sum(-1, keepdims=True)
  return teacher_prob.max(-1), teacher_prob.argmax(-1)


def reference_loss(params, *, state, batch, teacher, model, config):
  """UniMatch + UCCL step loss composed from the losses module, pass by pass.

  `batch` and `teacher` are NumPy (closed over, not traced). With
  unsup.anchors = 'pasted' the two weak passes are replaced by pasting, in
  NumPy at feature resolution, the teacher's outputs for the mixing images
  into the weak outputs of the labeled+weak pass. Returns
  (loss, (metrics, batch_stats after the passes)).
  """
  lab, u, mix = batch['labeled'], batch['unlabeled'], batch['mix']
  keys = {p: step.pass_rng(state.rng, state.step, 0, p) for p in (1, 2, 3, 4)}
  conf_mix, label_mix = teacher

  ign_u, ign_mix = u['ignore'], mix['ignore']
  ign1, ign2 = paste(u['box1'], ign_mix, ign_u), paste(u['box2'], ign_mix, ign_u)
  weak1 = paste(u['box1'], mix['weak'], u['weak'])
  weak2 = paste(u['box2'], mix['weak'], u['weak'])
  strong1 = paste(u['box1'], mix['strong1'], u['strong1'])
  strong2 = paste(u['box2'], mix['strong2'], u['strong2'])
  # Feature resolution 17 from 33: the align-corners grid hits every 2nd pixel.
  ign1_low, ign2_low = ign1[:, ::2, ::2], ign2[:, ::2, ::2]

  pasted = config.unsup.anchors == 'pasted'
  passes = [(weak1, 1, False), (weak2, 2, False)] if not pasted else []
  passes += [(np.concatenate([lab['image'], u['weak']]), 3, True),
             (np.concatenate([strong1, strong2]), 4, False)]
  stats = state.batch_stats
  outs = []
  for images, p, fp in passes:
    out, upd = model.apply({'params': params, 'batch_stats': stats}, images, train=True,
                           feature_perturbation=fp, rngs={'dropout': keys[p]},
                           mutable=['batch_stats'])
    if p != 4 or config.unsup.bn_stats_from_strong:  # False: the strong pass's update is dropped
      stats = upd['batch_stats']
    outs.append(out)
  out_xw, out_s = outs[-2:]
  n = lab['image'].shape[0]
  if pasted:
    mix_out = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                          mix['weak'], train=False)
    out_w1, out_w2 = [{name: jnp.where((box[:, ::2, ::2] == 1)[..., None],
                                       mix_out[name], out_xw[name][n:])
                       for name in ('features', 'logits_lowres')}
                      for box in (u['box1'], u['box2'])]
  else:
    out_w1, out_w2 = outs[:2]
  weak_logits = jax.lax.stop_gradient(out_xw['logits'][n:])
  conf_w = jnp.max(jax.nn.softmax(weak_logits), -1)
  label_w = jnp.argmax(weak_logits, -1)
  thresh = config.unsup.conf_thresh
  loss_x = losses.cross_entropy(out_xw['logits'][:n], lab['mask'])
  loss_s1 = losses.pseudo_label_loss(
      out_s['logits'][:n], jnp.where(u['box1'] == 1, label_mix, label_w),
      jnp.where(u['box1'] == 1, conf_mix, conf_w), ign1, threshold=thresh)
  loss_s2 = losses.pseudo_label_loss(
      out_s['logits'][n:], jnp.where(u['box2'] == 1, label_mix, label_w),
      jnp.where(u['box2'] == 1, conf_mix, conf_w), ign2, threshold=thresh)
  loss_fp = losses.pseudo_label_loss(out_xw['logits_fp'][n:], label_w, conf_w, ign_u,
                                     threshold=thresh)
  sbu, ckr = [], []
  for k, (out_w, ign_low) in enumerate([(out_w1, ign1_low), (out_w2, ign2_low)]):
    strong = slice(k * n, (k + 1) * n)
    sbu.append(losses.sbu_loss(out_w['logits_lowres'], out_s['logits_lowres'][strong],
                               out_w['features'], out_s['features'][strong], ign_low,
                               threshold=config.sbu.threshold, variant=config.sbu.variant))
    ckr.append(losses.ckr_loss(out_w['logits_lowres'], out_w['features'],
                               out_s['features'][strong], ign_low))
  loss = ((loss_x + 0.25 * loss_s1 + 0.25 * loss_s2 + 0.5 * loss_fp) / 2
          + config.sbu.weight * (sbu[0] + sbu[1]) / 2 + config.ckr.weight * (ckr[0] + ckr[1]) / 2)
  valid = ~ign_u
  mask_ratio = jnp.sum((conf_w >= thresh) & valid) / np.sum(valid)
  metrics = dict(loss=loss, loss_x=loss_x, loss_s=(loss_s1 + loss_s2) / 2, loss_fp=loss_fp,
                 loss_sbu=(sbu[0] + sbu[1]) / 2, loss_ckr=(ckr[0] + ckr[1]) / 2,
                 mask_ratio=mask_ratio)
  return loss, (metrics, stats)


@pytest.mark.parametrize('anchors,bn_stats_from_strong', [('passes', True), ('pasted', True),
                                                          ('passes', False)])
def test_loss_terms_and_gradient_match_direct_composition(anchors, bn_stats_from_strong):
  # lr 1000, no weight decay: the first update is -1000 * gradient, read back below.
  config = make_config(lr=1000.0, lr_multi=1.0, weight_decay=0.0)
  config.unsup.anchors = anchors
  config.unsup.bn_stats_from_strong = bn_stats_from_strong
  model, state = init_state(config, total_steps=10**9)
  batch = make_batch(seed=3)
  dense = dense_batch(batch)

  teacher = teacher_prediction(state, dense, model)
  (_, (ref_metrics, ref_stats)), ref_grads = jax.jit(jax.value_and_grad(
      functools.partial(reference_loss, state=state, batch=dense, teacher=teacher, model=model,
                        config=config), has_aux=True))(state.params)
  # The test exercises both sides of every threshold.
  assert 0.05 < float(ref_metrics['mask_ratio']) < 0.95
  conf_mix = teacher[0]
  assert (conf_mix >= config.unsup.conf_thresh).any() and (conf_mix < config.unsup.conf_thresh).any()
  assert float(ref_metrics['loss_sbu']) > 0 and float(ref_metrics['loss_ckr']) > 0

  new_state, metrics = jax.jit(functools.partial(step.train_step, model=model, config=config))(
      state, batch)
  for name, value in ref_metrics.items():
    assert float(metrics[name]) == pytest.approx(float(value), rel=1e-5, abs=1e-7), name
  assert float(metrics['lr']) == pytest.approx(1000.0)

  step_grads = jax.tree.map(lambda p, q: (np.asarray(p, np.float64) - q) / 1000.0,
                            state.params, new_state.params)
  flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
  flat_step = jax.tree.leaves(step_grads)
  for (path, want), got in zip(flat_ref, flat_step):
    assert rel_close(got, want, 1e-4), jax.tree_util.keystr(path)
  # The BN statistics went through the passes in the reference order.
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(ref_stats),
                               jax.tree.leaves(new_state.batch_stats)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert int(new_state.step) == 1
  if not bn_stats_from_strong:  # the setting changes the statistics, not the loss or gradient
    config.unsup.bn_stats_from_strong = True
    release_state, release_metrics = jax.jit(functools.partial(step.train_step, model=model,
                                                               config=config))(state, batch)
    assert float(release_metrics['loss']) == float(metrics['loss'])
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(release_state.batch_stats),
                                                     jax.tree.leaves(new_state.batch_stats)))


# ---------------------------------------------------------------------------
# Methods, ablations, sharding, accumulation


@pytest.mark.parametrize('method', ['supervised', 'unimatch'])
def test_method_trains_on_fixed_batch(method):
  config = make_config(method, lr=0.02)
  # Threshold 0: every valid pixel has a pseudo label, so the set of pixels
  # that count does not grow as the network becomes confident (with 0.45 the
  # unlabeled losses rise as pixels pass the threshold, although training works).
  config.unsup.conf_thresh = 0.0
  batch = make_batch(seed=5)
  _, history = run_steps(config, [batch] * 6, jax.devices()[:1])
  assert all(np.isfinite(v) for h in history for v in h.values())
  total = [h['loss'] for h in history]
  assert total[-1] < total[0], total
  assert history[0]['loss_x'] > 0
  if method == 'supervised':
    assert all(h['loss_s'] == h['loss_fp'] == h['mask_ratio'] == 0 for h in history)
  else:
    assert all(h['loss_s'] > 0 and h['loss_fp'] > 0 for h in history)
    assert all(h['mask_ratio'] == 1.0 for h in history)
  assert all(h['loss_sbu'] == h['loss_ckr'] == 0 for h in history)


@pytest.mark.parametrize('sbu_enabled,ckr_enabled,grad_accum,num_devices',
                         [(True, False, 2, 2), (False, True, 1, 1)])
def test_uccl_ablation_rows(sbu_enabled, ckr_enabled, grad_accum, num_devices):
  """SBU-only and CKR-only; the first also accumulates 2 micro-batches on 2 devices."""
  config = make_config('uccl', grad_accum=grad_accum)
  config.sbu.enabled, config.ckr.enabled = sbu_enabled, ckr_enabled
  _, history = run_steps(config, [make_batch(seed=2)] * 2, jax.devices()[:num_devices])
  assert all(np.isfinite(v) for h in history for v in h.values())
  for metrics in history:
    assert (metrics['loss_sbu'] > 0) == sbu_enabled
    assert (metrics['loss_ckr'] > 0) == ckr_enabled


def test_grad_accum_equals_big_batch_gradient():
  # BatchNorm makes an image's output depend on its batch, so the check uses a
  # batch whose two micro-batches are identical: each micro-batch then has the
  # big batch's BN statistics (mean and biased variance of [X; X] equal
  # those of X), and the averaged micro-batch gradient must equal the big
  # batch gradient (a summed one would be twice as large).
  half = make_batch(seed=7, batch=2)
  # Micro-batch j takes rows j, j + k, ...: repeating each row puts X in both.
  doubled = jax.tree.map(lambda x: np.repeat(x, 2, axis=0), half)
  deltas = {}
  for k in (1, 2):
    config = make_config('supervised', lr=100.0, lr_multi=1.0, weight_decay=0.0, grad_accum=k)
    model, state = init_state(config, total_steps=10**9)
    new_state, metrics = jax.jit(functools.partial(step.train_step, model=model, config=config))(
        state, doubled)
    deltas[k] = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, new_state.params,
                             state.params)
    assert np.isfinite(float(metrics['loss']))
  for a, b in zip(jax.tree.leaves(deltas[2]), jax.tree.leaves(deltas[1])):
    assert rel_close(a, b, 1e-4)
    assert np.max(np.abs(b)) > 0


def test_full_size_deeplab_step_shapes():
  """The real network at the Pascal setting, bf16, OHEM and accumulation, traced only."""
  from uccl_jax.models import deeplab  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.model.dtype = 'bfloat16'
  config.train.batch_size = 4
  config.train.grad_accum = 2
  config.train.labeled_loss = 'ohem'
  model = deeplab.from_config(config.model, 21)
  state = jax.eval_shape(
      lambda key: step.create_train_state(config, model, key, (321, 321, 3), total_steps=1000),
      jax.random.PRNGKey(0))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       make_batch(batch=4, size=321))
  new_state, metrics = jax.eval_shape(
      functools.partial(step.train_step, model=model, config=config), state, batch)
  assert sum(x.size for x in jax.tree.leaves(state.params)) == 40_475_957
  assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state) == jax.tree.map(
      lambda x: (x.shape, x.dtype), state)
  assert sorted(metrics) == sorted(step.METRIC_NAMES)
  assert all(m.shape == () and m.dtype == jnp.float32 for m in metrics.values())


# ---------------------------------------------------------------------------
# Bad configs


def test_bad_batch_size_names_the_field():
  config = make_config(batch_size=6)
  model = TinySegmenter()
  with pytest.raises(parallel.BatchSizeError, match=r'train\.batch_size=6'):
    step.make_train_step(model, config, parallel.make_mesh())


def test_bad_method_and_loss_name_the_field():
  model = TinySegmenter()
  mesh = parallel.make_mesh()
  config = make_config('fixmatch')
  with pytest.raises(step.StepConfigError, match='method='):
    step.make_train_step(model, config, mesh)
  config = make_config(labeled_loss='focal')
  with pytest.raises(step.StepConfigError, match=r'train\.labeled_loss='):
    step.make_train_step(model, config, mesh)
  config = make_config()
  config.unsup.anchors = 'teacher'
  with pytest.raises(step.StepConfigError, match=r"unsup\.anchors='teacher'"):
    step.make_train_step(model, config, mesh)
