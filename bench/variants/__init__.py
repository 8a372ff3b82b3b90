"""The servers the service is measured against: small, honest, and configured like it."""
