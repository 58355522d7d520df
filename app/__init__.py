"""User-facing applications: the ``accel`` command (and, later, the Gradio app)."""
