from django.urls import path

from jobs import views

urlpatterns = [
    path("", views.job_list_page, name="job-page-list"),
    path("<str:job_id>/", views.job_detail_page, name="job-page-detail"),
    # What the job page redraws when an event arrives (staff sessions, as the page).
    path("<str:job_id>/data", views.job_detail_data, name="job-page-data"),
]
