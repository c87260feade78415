//! Control images made from pictures and poses, as the common ControlNet
//! preprocessors (lllyasviel's annotators, `controlnet_aux`) make them: Canny edges
//! and the OpenPose skeleton. Each returns an RGB image for
//! [`crate::ControlInput::new`].

mod canny;
mod pose;

pub use canny::canny;
pub use pose::{OpenPose, PoseKeypoints, draw_openpose};
