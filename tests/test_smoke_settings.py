from django.conf import settings


def test_settings_loaded_from_test_env():
    assert settings.REDIS_URL.endswith("/15")
