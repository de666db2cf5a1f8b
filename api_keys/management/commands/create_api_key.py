"""python manage.py create_api_key NAME [--staff]: prints the new key alone on its last line."""

from django.core.management.base import BaseCommand, CommandError

from api_keys.models import ApiKey


class Command(BaseCommand):
    help = "Create an API key. The key is shown once, on the last line; only its hash is stored."

    def add_arguments(self, parser):
        parser.add_argument("name", help="who or what will use the key")
        parser.add_argument("--staff", action="store_true", help="the key sees every job and may force-resume")

    def handle(self, *args, name, staff=False, **options):
        name = name.strip()
        if not name:
            raise CommandError("Give the key a name, e.g. create_api_key billing-service")
        api_key, raw_key = ApiKey.objects.create_key(name=name[:100], is_staff=staff)
        kind = "staff " if staff else ""
        self.stderr.write(f"Created {kind}API key {api_key} (id {api_key.pk}). Store it now: it is not shown again.")
        self.stdout.write(raw_key)
