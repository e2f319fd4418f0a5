//! Restore orchestration: integrity, disk floor, capacity, launch; templates, pause/resume and warm pools.
