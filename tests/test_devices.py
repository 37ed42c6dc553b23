import jax


def test_eight_simulated_devices():
  # Multi-device tests rely on this; they must never silently run on one device.
  assert jax.device_count() == 8
  assert jax.default_backend() == "cpu"
