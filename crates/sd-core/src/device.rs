//! Whether a device can run anything at all.
//!
//! burn's GPU backends start lazily: a [`Device`] for CUDA or wgpu is only a name
//! until its first operation, and a machine without the driver (no `libcuda.so`, no
//! Vulkan/Metal adapter) makes that first operation panic on the backend's thread.
//! [`check_device`] runs one tiny operation first and turns that panic into an error.

use crate::CoreError;
use burn::tensor::{Device, Tensor};

/// Runs one tiny operation (a 1-element tensor written and read back) on `device`.
///
/// # Errors
/// [`CoreError::Device`] with the backend's message when the operation fails or
/// panics, e.g. `--features cuda` on a machine without an NVIDIA driver.
pub fn check_device(device: &Device) -> Result<(), CoreError> {
    let probe = std::panic::catch_unwind(|| {
        Tensor::<1>::from_floats([1.0f32], device)
            .add_scalar(1.0)
            .into_data()
            .try_to_vec::<f32>()
    });
    let message = match probe {
        Ok(Ok(values)) if values == [2.0] => return Ok(()),
        Ok(Ok(values)) => format!("1 + 1 came back as {values:?}"),
        Ok(Err(err)) => format!("{err:?}"),
        Err(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the backend panicked".into()),
    };
    // The backend's own panic happens on its device thread (printed to stderr by the
    // panic hook); this thread only sees the thread's channel close.
    let message = if message.contains("RecvError") || message.contains("isconnected") {
        format!(
            "the backend's device thread stopped while starting ({message}); its own \
             message is printed above. For CUDA: is the NVIDIA driver installed and \
             libcuda.so.1 on the library path? For wgpu: is there a Vulkan/Metal/DX12 \
             driver (on Linux without a GPU: Mesa's mesa-vulkan-drivers)?"
        )
    } else {
        message
    };
    Err(CoreError::Device {
        device: format!("{device:?}"),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_usable() {
        check_device(&Device::flex()).unwrap();
    }
}
