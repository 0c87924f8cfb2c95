//! napi binding of sticky-cluster (work in progress).
