from django.contrib import admin
from django.urls import path

from ops import views

# Mounted under /admin/, before the admin's own URLs.
urlpatterns = [
    path("overview/", admin.site.admin_view(views.overview_page), name="ops-overview"),
    path("overview/data", views.overview_data, name="ops-overview-data"),
]
