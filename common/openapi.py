"""drf-spectacular hook: document the one error shape and the statuses each operation can answer."""

ERROR_SCHEMA = {
    "type": "object",
    "required": ["success", "error"],
    "properties": {
        "success": {"type": "boolean", "enum": [False]},
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "example": "JOB_NOT_FOUND"},
                "message": {"type": "string"},
                "details": {},
            },
        },
    },
}

DESCRIPTIONS = {
    "400": "Malformed JSON or invalid input.",
    "401": "Missing or invalid API key.",
    "403": "Not allowed for this key.",
    "404": "No such job (or not yours).",
    "409": "The job's state does not allow this.",
    "413": "The request body is too large.",
    "429": "Too many requests; see Retry-After.",
}

UNAUTHENTICATED_PATHS = ("/api/v1/health", "/api/v1/health/ready", "/api/v1/schema")


def add_error_responses(result, generator, request, public):
    """POSTPROCESSING_HOOKS entry: adds the Error schema and error responses."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    for path, operations in result.get("paths", {}).items():
        for method, operation in operations.items():
            for status in _error_statuses(path, method, operation):
                operation["responses"].setdefault(
                    status,
                    {
                        "description": DESCRIPTIONS[status],
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                    },
                )
    return result


def _error_statuses(path, method, operation):
    if path in UNAUTHENTICATED_PATHS:
        return []
    statuses = ["401", "403", "429"]
    if method in ("post", "put", "patch") or operation.get("parameters"):
        statuses.append("400")
    if method == "post":
        statuses.append("413")
    if "{job_id}" in path:
        statuses.append("404")
    if path.endswith(("/resume", "/cancel")) or (path == "/api/v1/jobs" and method == "post"):
        statuses.append("409")
    return statuses
