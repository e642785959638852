"""Ray pieces of gold-ray: the teacher Serve deployment, scoring actors and the generation pipeline."""
