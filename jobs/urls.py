from django.urls import path

from jobs import apis, sse

urlpatterns = [
    path("jobs", apis.JobCollectionApi.as_view(), name="job-collection"),
    path("jobs/<str:job_id>", apis.JobDetailApi.as_view(), name="job-detail"),
    path("jobs/<str:job_id>/resume", apis.JobResumeApi.as_view(), name="job-resume"),
    path("jobs/<str:job_id>/cancel", apis.JobCancelApi.as_view(), name="job-cancel"),
    path("jobs/<str:job_id>/events", apis.JobEventsApi.as_view(), name="job-events"),
    # An async view: cao_project.asgi serves this path on Django's ASGI handler (STREAM_PATHS).
    path("jobs/<str:job_id>/stream", sse.job_event_stream, name="job-stream"),
]
