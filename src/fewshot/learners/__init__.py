"""learners stage."""
