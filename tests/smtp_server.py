"""aiosmtpd SMTP fixtures."""
