//! `sticky_fn!`, the one way to declare a C export: `#[no_mangle] extern "C"`, the panic boundary, and the
//! value returned on failure chosen from the return type ([`Failed`]), so no export can forget any of them.

use std::ffi::{c_char, c_int};

/// Declares a C export. The body returns `Result<T, Failure>`; it runs inside the panic boundary
/// (`crate::error::boundary`), which remembers the failure for `sticky_last_error_message` and returns
/// [`Failed::failed`] of the return type, or the value written after `?=` (hyper's `ffi_fn!` syntax) for an
/// export whose failure is not an error code (`-1` for an index or an fd).
///
/// `tools/generate_header.rs` expands these for cbindgen and refuses a hand-written `#[no_mangle]` export.
macro_rules! sticky_fn {
    ($(#[$attr:meta])* pub unsafe fn $name:ident($($arg:ident: $arg_ty:ty),* $(,)?) $(-> $ret:ty)?
        $body:block $(?= $failure:expr)?) => {
        $(#[$attr])*
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $arg_ty),*) $(-> $ret)? {
            $crate::error::boundary(|code| sticky_fn!(@failure code $($failure)?), || $body)
        }
    };
    ($(#[$attr:meta])* pub fn $name:ident($($arg:ident: $arg_ty:ty),* $(,)?) $(-> $ret:ty)?
        $body:block $(?= $failure:expr)?) => {
        $(#[$attr])*
        #[no_mangle]
        pub extern "C" fn $name($($arg: $arg_ty),*) $(-> $ret)? {
            $crate::error::boundary(|code| sticky_fn!(@failure code $($failure)?), || $body)
        }
    };
    (@failure $code:ident) => {
        $crate::export::Failed::failed($code)
    };
    (@failure $code:ident $failure:expr) => {{
        let _ = $code;
        $failure
    }};
}

/// What an export returns when it fails, by its return type.
pub(crate) trait Failed {
    /// The failure value for error `code`.
    fn failed(code: c_int) -> Self;
}

/// An `int` export returns the error code itself (`STICKY_EINVAL`, ...).
impl Failed for c_int {
    fn failed(code: c_int) -> c_int {
        code
    }
}

/// A `void` export returns nothing; the last error still says what failed.
impl Failed for () {
    fn failed(_: c_int) {}
}

/// A `bool` export answers `false`.
impl Failed for bool {
    fn failed(_: c_int) -> bool {
        false
    }
}

/// A string export returns "", never NULL.
impl Failed for *const c_char {
    fn failed(_: c_int) -> *const c_char {
        c"".as_ptr()
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::{c_char, c_int, CStr};

    use crate::error::{sticky_last_error_message, Failure, STICKY_EINTERNAL, STICKY_EINVAL};

    sticky_fn! {
        /// Panics: the boundary answers with the code.
        pub fn sticky_test_panics_with_a_code() -> c_int {
            panic!("a planted bug")
        }
    }

    sticky_fn! {
        /// Panics: the boundary answers -1, as written after `?=`.
        pub fn sticky_test_panics_with_minus_one() -> c_int {
            panic!("another planted bug")
        } ?= -1
    }

    sticky_fn! {
        /// Panics: a string export answers "".
        pub fn sticky_test_panics_with_text() -> *const c_char {
            panic!("a third planted bug")
        }
    }

    sticky_fn! {
        /// Fails without a panic: the failure's code comes back.
        pub unsafe fn sticky_test_fails(argument: *const c_char) -> c_int {
            if argument.is_null() {
                return Err(Failure::null("argument"));
            }
            Ok(0)
        }
    }

    fn last_message() -> String {
        // SAFETY: the library's message is a valid C string until the next failure on this thread.
        unsafe { CStr::from_ptr(sticky_last_error_message()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn a_panic_becomes_the_failure_value_of_the_return_type_and_a_message() {
        assert_eq!(sticky_test_panics_with_a_code(), STICKY_EINTERNAL);
        assert_eq!(last_message(), "internal error (a bug in sticky-cluster): a planted bug");
        assert_eq!(sticky_test_panics_with_minus_one(), -1);
        assert!(last_message().ends_with("another planted bug"));
        // SAFETY: the export returns a static C string.
        assert_eq!(unsafe { CStr::from_ptr(sticky_test_panics_with_text()) }.to_bytes(), b"");
        // SAFETY: NULL is allowed; the export checks it.
        assert_eq!(unsafe { sticky_test_fails(std::ptr::null()) }, STICKY_EINVAL);
        assert_eq!(last_message(), "argument must not be NULL");
    }
}
