//! C ABI over sticky-cluster (work in progress).
