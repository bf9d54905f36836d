"""Environment variables the queue profile reads (kept apart: importing the profile
connects a lab)."""

ENV_LAB = "LABCTL_QUEUE_LAB"
ENV_SPEED = "LABCTL_QUEUE_SPEED"
