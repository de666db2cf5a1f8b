"""The reference configuration of the brief: five services, two recipes.

Used by the seeding data migration and by tests that need the registry back
after a transactional test flushed it. Plain data, no model imports, so a
migration can apply it with historical models.
"""

# The queues a deployment runs a worker pool for, heaviest first (CAO_QUEUES
# defaults to them; the services below name one each).
QUEUES = ("heavy", "medium", "default")

SERVICES = [
    # name, queue, limit, timeout_s, lease_ttl_s, max_attempts, default base URL
    ("video_gen_v2", "heavy", 2, 600, 660, 3, "http://video-gen:9000"),
    ("fast_chat_llm", "medium", 15, 15, 30, 5, "http://fast-chat:9000"),
    ("summarizer_pro", "medium", 10, 30, 60, 5, "http://summarizer:9000"),
    ("prompt_enhancer", "default", 50, 5, 15, 6, "http://prompt-enhancer:9000"),
    ("email_notifier", "default", 100, 5, 15, 6, "http://email-notifier:9000"),
]

RECIPES = [
    (
        "business_plan",
        "Enhance the prompt, draft a plan with an LLM, summarize it and email it.",
        ["prompt_enhancer", "fast_chat_llm", "summarizer_pro", "email_notifier"],
    ),
    (
        "viral_video",
        "Enhance the prompt, generate a video and email the link.",
        ["prompt_enhancer", "video_gen_v2", "email_notifier"],
    ),
]


def seed(service_model, recipe_model, step_model):
    """Create (or restore) the reference services and recipes; returns nothing."""
    services = {}
    for name, queue, limit, timeout_s, lease_ttl_s, attempts, base_url in SERVICES:
        services[name], _ = service_model.objects.update_or_create(
            name=name,
            defaults={
                "queue": queue,
                "concurrency_limit": limit,
                "timeout_s": timeout_s,
                "lease_ttl_s": lease_ttl_s,
                "max_attempts": attempts,
                "base_url": base_url,
                "execute_path": "/v1/execute",
                "health_path": "/health",
                "auth_type": "none",
                "enabled": True,
            },
        )
    for name, description, steps in RECIPES:
        recipe, _ = recipe_model.objects.update_or_create(
            name=name, defaults={"description": description, "enabled": True}
        )
        step_model.objects.filter(recipe=recipe).delete()
        step_model.objects.bulk_create(
            step_model(recipe=recipe, position=position, service=services[service])
            for position, service in enumerate(steps)
        )
