"""`generate` keeps the routers it builds on the model object, not in a module global."""
import gc
import weakref

import numpy as np

from fiancee_jax.inference import generate as generate_lib
from fiancee_jax.routing import router
from tests.routing.router_test import tiny_labels
from tests.routing.router_test import tiny_model


def test_routers_live_on_the_model_and_go_with_it():
  m = tiny_model().replace()  # a model of its own, so that the shared one keeps its routers
  assert m.routers == {}
  labels = tiny_labels(3, seed=5)
  out = generate_lib.generate(m, labels, threshold=0.5, seed=1)
  one = generate_lib.generate(m, labels[:1], threshold=0.5, seed=1)
  assert isinstance(m.routers['bucketed'], router.BucketedRouter)
  assert isinstance(m.routers['switch'], router.SwitchRouter)
  assert m.routers['bucketed'].model is m and m.routers['switch'].model is m
  bucketed = m.routers['bucketed']
  generate_lib.generate(m, labels, threshold=0.1, seed=2)
  assert m.routers['bucketed'] is bucketed  # reused, not rebuilt
  assert out['images'].shape == (3, 16, 16, 3) and one['exit_ids'].shape == (1,)
  # Another model (even with the same weights) gets routers of its own.
  other = m.replace()
  assert other.routers == {}
  generate_lib.generate(other, labels, threshold=0.5, seed=1)
  assert other.routers['bucketed'] is not bucketed
  np.testing.assert_array_equal(
      generate_lib.generate(other, labels, threshold=0.5, seed=1)['exit_ids'], out['exit_ids'])
  # Nothing outside the model holds them: they are freed with it.
  ref = weakref.ref(bucketed)
  del m, bucketed, other
  gc.collect()
  assert ref() is None
