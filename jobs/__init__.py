"""Ray jobs: the cluster entrypoint of a distillation, its submission client, and the Serve app builder.

- :mod:`jobs.distill`: ``python -m jobs.distill --config CONFIG``, the command a Ray job runs.
- :mod:`jobs.submit`: submit that command to a cluster (``gold-ray submit``) and follow it.
- :mod:`jobs.serve_app`: ``jobs.serve_app:app_from_args``, the import path a Serve config (KubeRay
  ``RayService``) uses to host the teacher alone.
"""
