"""The reconcile machinery: an informer-fed store, a work queue, and per-pool reconcilers."""
