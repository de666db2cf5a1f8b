"""The JSON parser of the API: strict JSON, with a clear 400 for what jsonb cannot store."""

import codecs

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from common import json_values


class SafeJSONParser(JSONParser):
    """DRF's JSON parser, refusing NaN, Infinity, overflowing numbers and pathological nesting."""

    def parse(self, stream, media_type=None, parser_context=None):
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            return json_values.loads(codecs.getreader(encoding)(stream).read())
        except (json_values.InvalidJSON, UnicodeDecodeError) as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
