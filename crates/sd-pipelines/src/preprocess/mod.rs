//! Control images made from pictures and poses, as the common ControlNet
//! preprocessors (lllyasviel's annotators, `controlnet_aux`) make them: Canny edges,
//! the OpenPose skeleton and depth maps (Depth Anything in burn). Each returns an RGB
//! image for [`crate::ControlInput::new`].

mod canny;
mod depth;
mod pose;

pub use canny::canny;
pub use depth::{DepthEstimator, DepthImageProcessorConfig, ProcessorSize};
pub use pose::{OpenPose, PoseKeypoints, draw_openpose};
