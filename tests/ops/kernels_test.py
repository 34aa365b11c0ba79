"""config.kernels: 'auto' resolved in one place, models built on the names it gives, the same
parameters on every implementation."""
import jax
import jax.numpy as jnp
import pytest

from configs import avatars
from configs import landscapes
from fiancee_jax import tasks
from fiancee_jax.models import factory
from fiancee_jax.ops import conv
from fiancee_jax.ops import kernels
from fiancee_jax.ops import top_k

CPU_FORMS = {'conv': 'toeplitz_even', 'top_k': 'two_stage'}


def test_auto_is_the_fastest_measured_per_platform():
  assert kernels.resolve({'conv': 'auto', 'top_k': 'auto'}, 'cpu') == CPU_FORMS
  for platform in ('gpu', 'tpu', 'METAL'):
    assert kernels.resolve({'conv': 'auto', 'top_k': 'auto'}, platform) == dict(kernels.XLA)
  # Names pass through; a section that leaves ops out (or is missing) means 'auto'.
  assert kernels.resolve({'conv': 'even', 'top_k': 'xla'}, 'cpu') == {'conv': 'even',
                                                                      'top_k': 'xla'}
  assert kernels.resolve({'top_k': 'xla'}, 'cpu') == {'conv': 'toeplitz_even', 'top_k': 'xla'}
  assert kernels.resolve(None, 'cpu') == CPU_FORMS
  assert set(kernels.CHOICES['conv']) <= set(conv.CONV_IMPLS)
  assert set(kernels.CHOICES['top_k']) == set(top_k.TOP_K_IMPLS)


def test_bad_kernels_name_the_problem():
  with pytest.raises(ValueError, match=r"config\.kernels\.conv='winograd'"):
    kernels.resolve({'conv': 'winograd'}, 'cpu')
  with pytest.raises(ValueError, match=r"unknown ops \['attention'\]"):
    kernels.resolve({'attention': 'flash'}, 'cpu')
  with pytest.raises(ValueError, match='toeplitz_even'):  # a per-call form, not a model's
    kernels.resolve({'conv': 'toeplitz'}, 'cpu')
  with pytest.raises(ValueError, match='exactly the ops'):
    kernels.check_concrete({'conv': 'xla'})
  with pytest.raises(ValueError, match="resolve 'auto'"):
    kernels.check_concrete({'conv': 'auto', 'top_k': 'xla'})
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.kernels.conv = 'fft'
  with pytest.raises(ValueError, match=r'config\.kernels\.conv'):
    factory.make_generator(config)


def test_factory_builds_the_configured_kernels():
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.kernels.update(conv='even', top_k='two_stage')
  em = factory.make_exit_model(config, guided=True)
  assert em.backbone.conv_impl == 'even' and em.lookup.top_k_impl == 'two_stage'
  assert em.backbone.light_factory.conv_impl == 'even'  # the exits' light blocks too
  assert factory.make_discriminator(config).conv_impl == 'even'
  em = factory.make_exit_model(config, guided=True, kernels=kernels.XLA)
  assert em.backbone.conv_impl == 'xla' and em.lookup.top_k_impl == 'xla'
  with pytest.raises(ValueError, match="resolve 'auto'"):
    factory.make_generator(config, kernels={'conv': 'auto', 'top_k': 'auto'})
  # The default config asks for 'auto': resolved for JAX's default backend by the factory.
  config = landscapes.get_config('tiny')
  assert factory.make_generator(config).conv_impl == factory.kernels(config)['conv']
  assert factory.kernels(config, 'gpu') == dict(kernels.XLA)


@pytest.mark.cpu_only
def test_auto_runs_the_cpu_forms_on_the_cpu():
  assert jax.default_backend() == 'cpu'
  config = landscapes.get_config('tiny')
  assert factory.kernels(config) == CPU_FORMS
  assert factory.make_exit_model(config, guided=True).lookup.top_k_impl == 'two_stage'


def _generators(config):
  return [factory.make_generator(config, kernels={'conv': impl, 'top_k': 'xla'})
          for impl in kernels.CHOICES['conv']]


@pytest.mark.parametrize('config_module', [landscapes, avatars])
def test_parameters_do_not_depend_on_the_kernels(config_module):
  # Trained checkpoints load whatever config.kernels says.
  config = config_module.get_config('tiny')
  specs = tasks.input_specs(factory.get_task(config), 4)
  trees = [jax.tree.map(jnp.shape, jax.eval_shape(g.init, jax.random.key(0), *specs))
           for g in _generators(config)]
  assert all(t == trees[0] for t in trees[1:])


def test_the_backbone_runs_the_kernels_it_was_built_with():
  # At batch 4 the 2x2 stem and first block are Toeplitz matmuls on 'toeplitz_even' only
  # (traced, not compiled: the program is what the names say, on any backend).
  config = landscapes.get_config('tiny')
  specs = tasks.input_specs(factory.get_task(config), 4)
  for impl in kernels.CHOICES['conv']:
    g = factory.make_generator(config, kernels={'conv': impl, 'top_k': 'xla'})
    v = jax.eval_shape(g.init, jax.random.key(0), *specs)
    text = str(jax.make_jaxpr(lambda v, *x, g=g: g.apply(v, *x))(v, *specs))
    assert ('dot_general' in text) == (impl == 'toeplitz_even'), impl
