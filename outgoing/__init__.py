"""The domain layer shared by the control panel, the SMTP proxy and the worker."""
