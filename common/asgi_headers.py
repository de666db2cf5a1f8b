"""ASGI middleware: drop request headers whose names contain an underscore, before WSGI sees them.

The WSGI environ spells ``X-API-Key``, ``X_API_Key`` and ``X-Api_Key`` alike
(``HTTP_X_API_KEY``), so a proxy that strips or sets ``X-API-Key`` (or
``X-Forwarded-Proto``) would let an underscore spelling through as its
alias. Like Django's runserver, nginx and Apache, this drops them all: such
a header is never seen, so an API key sent that way authenticates nothing.
"""


class DropUnderscoreHeaders:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and any(b"_" in name for name, _ in scope["headers"]):
            scope = dict(scope, headers=[(name, value) for name, value in scope["headers"] if b"_" not in name])
        return await self.app(scope, receive, send)
