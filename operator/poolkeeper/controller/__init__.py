"""The reconcile machinery: an informer-fed store, a rate-limited work queue, the pool
reconciler (pools.py, its steps) and what it reports (report.py)."""
