//! C ABI over sticky-cluster: `libsticky_cluster.{so,a}` and `include/sticky_cluster.h` (cbindgen).
//! A thin translation layer: opaque handles, integer error codes, no panic across the boundary.
//!
//! - [`error`]: the error codes, `sticky_strerror` and the thread-local last error;
//! - [`worker`]: `sticky_worker_*`, the worker side for a C event loop;
//! - [`options`]: `sticky_options`, the YAML file's fields in C types, checked by core's validation;
//! - [`run`]: `sticky_run*`, the C counterpart of `require('sticky-cluster')(start, options)`;
//! - [`cluster`]: `sticky_cluster_*`, the master as a handle (start, reload, stop, wait) for programs that own
//!   their signals.

// The C names (`sticky_worker`, `sticky_options`) are the API; cbindgen copies them as written.
#![allow(non_camel_case_types)]

// First: the other modules declare their exports with its `sticky_fn!`.
#[macro_use]
mod export;
pub mod cluster;
pub mod error;
pub mod options;
pub mod run;
pub mod worker;
