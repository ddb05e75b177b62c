"""Files and object storage: local folders and S3 stores (the only code that touches s3://), atomic
file writes. Imports only core."""
