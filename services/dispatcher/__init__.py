"""The dispatcher: validates, classifies and admits tasks from the ingress stream."""
