"""The JSON parser of the API: DRF's, plus a clear 400 for pathological nesting."""

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser


class SafeJSONParser(JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            # json.loads recurses per nesting level; a small body of "[[[[..."
            # would otherwise escape as a 500.
            raise ParseError("JSON parse error - the document is nested too deeply.") from None
