"""Each API key gets a webhook signing secret of its own."""

from django.db import migrations, models

import api_keys.models


def give_each_key_its_own_secret(apps, schema_editor):
    # AddField evaluates a callable default once, so every existing row got the same one.
    ApiKey = apps.get_model("api_keys", "ApiKey")
    for api_key in ApiKey.objects.all():
        api_key.webhook_secret = api_keys.models.new_webhook_secret()
        api_key.save(update_fields=["webhook_secret"])


class Migration(migrations.Migration):

    dependencies = [
        ("api_keys", "0004_apikey_max_concurrent_jobs"),
    ]

    operations = [
        migrations.AddField(
            model_name="apikey",
            name="webhook_secret",
            field=models.CharField(default=api_keys.models.new_webhook_secret, editable=False, max_length=64),
        ),
        migrations.AddField(
            model_name="apikey",
            name="previous_webhook_secret",
            field=models.CharField(blank=True, default="", editable=False, max_length=64),
        ),
        migrations.AddField(
            model_name="apikey",
            name="previous_webhook_secret_until",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.RunPython(give_each_key_its_own_secret, migrations.RunPython.noop),
    ]
