//! The shape of every safe wrapper of one kernel, written once: a wrapper takes the kernels,
//! the stream and its plan's arguments with a device slice in place of each buffer, makes the
//! plan from the buffers' addresses, and launches it through `Kernels::launch_one` (which
//! checks the plan before anything is enqueued and holds the buffers' guards until it is).
//! The plan's own checks are the wrapper's: so no wrapper can forget one, or take a buffer
//! without its guard.

/// Defines `pub fn NAME[<T: Dtype>](kernels, stream, ARGS) -> Result<()>` launching
/// `plan::NAME[::<T>](ARGS)`, for each declaration
/// `pub fn NAME[<T>](arg: KIND [TYPE], ...);`, where KIND says what the caller passes and the
/// plan receives: `value TYPE` (passed through), `read E` (`&impl DevicePtr<E>`, read by the
/// launch), `write E` (`&mut impl DevicePtrMut<E>`, written by it) or `centers`
/// (`&DeviceCenters`, read by it). The module names its plans' module `plan`.
macro_rules! kernel_wrappers {
    ($(
        $(#[$attr:meta])*
        pub fn $name:ident $(<$T:ident>)? ($($arg:ident: $kind:ident $($ty:ty)?),* $(,)?);
    )*) => {$(
        $(#[$attr])*
        ///
        /// Everything is validated before the launch; nothing is allocated and nothing waits.
        pub fn $name $(<$T: crate::dtype::Dtype>)? (
            kernels: &crate::cuda::Kernels,
            stream: &cudarc::driver::CudaStream,
            $($arg: kernel_wrapper_param!($kind $($ty)?)),*
        ) -> crate::error::Result<()> {
            kernels.launch_one(stream, |launcher| {
                plan::$name $(::<$T>)? ($(kernel_wrapper_arg!(launcher, $kind, $arg)),*)
            })
        }
    )*};
}

/// The type a wrapper takes for an argument of `kernel_wrappers!`'s KIND.
macro_rules! kernel_wrapper_param {
    (value $ty:ty) => { $ty };
    (read $elem:ty) => { &impl cudarc::driver::DevicePtr<$elem> };
    (write $elem:ty) => { &mut impl cudarc::driver::DevicePtrMut<$elem> };
    (centers) => { &crate::cuda::DeviceCenters };
}

/// What the plan receives for an argument of `kernel_wrappers!`'s KIND: the value, or the
/// buffer's address and length, its guard kept by `launcher`.
macro_rules! kernel_wrapper_arg {
    ($launcher:ident, value, $arg:ident) => {
        $arg
    };
    ($launcher:ident, read, $arg:ident) => {
        $launcher.read($arg)
    };
    ($launcher:ident, write, $arg:ident) => {
        $launcher.write($arg)
    };
    ($launcher:ident, centers, $arg:ident) => {
        &$arg.buf($launcher)
    };
}
