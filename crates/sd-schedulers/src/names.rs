//! The one table of scheduler names: what users, the examples, the server's three
//! APIs and the pictures' parameters call each scheduler, and what it builds.

use crate::config::SchedulerConfig;

/// One named scheduler: our name, its A1111 / ComfyUI label (written into the
/// pictures' parameters), the other spellings clients use, and the diffusers class
/// it builds over a model's scheduler config (with its overrides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerName {
    /// Our name (`dpmpp-2m-karras`).
    pub name: &'static str,
    /// A1111's sampler name (`DPM++ 2M Karras`).
    pub a1111: &'static str,
    /// Other spellings (`k_dpmpp_2m_ka`, `dpm-solver++`).
    pub aliases: &'static [&'static str],
    /// The diffusers class built (`DPMSolverMultistepScheduler`).
    pub class: &'static str,
    /// `use_karras_sigmas` forced on or off (DPM++ 2M with and without Karras).
    pub karras: Option<bool>,
    /// The class built over a flow-matching config (SD 3.x), where the name has one.
    pub flow: Option<&'static str>,
}

/// Every scheduler name [`crate::AnyScheduler::from_name`] knows. A scheduler
/// family added to the crate adds its rows here and its class to
/// `AnyScheduler::from_class`. `class` is what a name builds over a diffusion
/// model's config, `flow` over a flow-matching one (SD 3.x); `heun` is flow-only.
pub const SCHEDULER_NAMES: &[SchedulerName] = &[
    SchedulerName {
        name: "ddim",
        a1111: "DDIM",
        aliases: &[],
        class: "DDIMScheduler",
        karras: None,
        flow: None,
    },
    SchedulerName {
        name: "euler",
        a1111: "Euler",
        aliases: &["k_euler"],
        class: "EulerDiscreteScheduler",
        karras: None,
        flow: Some("FlowMatchEulerDiscreteScheduler"),
    },
    SchedulerName {
        name: "euler-a",
        a1111: "Euler a",
        aliases: &["eulera", "k_euler_a", "k_euler_ancestral"],
        class: "EulerAncestralDiscreteScheduler",
        karras: None,
        flow: None,
    },
    SchedulerName {
        name: "dpmpp-2m",
        a1111: "DPM++ 2M",
        aliases: &["dpm-solver++", "dpmpp2m", "k_dpmpp_2m"],
        class: "DPMSolverMultistepScheduler",
        karras: Some(false),
        flow: Some("DPMSolverMultistepScheduler"),
    },
    SchedulerName {
        name: "dpmpp-2m-karras",
        a1111: "DPM++ 2M Karras",
        aliases: &["k_dpmpp_2m_ka"],
        class: "DPMSolverMultistepScheduler",
        karras: Some(true),
        flow: None,
    },
    SchedulerName {
        name: "lms",
        a1111: "LMS",
        aliases: &["k_lms"],
        class: "LMSDiscreteScheduler",
        karras: None,
        flow: None,
    },
    SchedulerName {
        name: "pndm",
        a1111: "PLMS",
        aliases: &[],
        class: "PNDMScheduler",
        karras: None,
        flow: None,
    },
    SchedulerName {
        name: "lcm",
        a1111: "LCM",
        aliases: &["k_lcm"],
        class: "LCMScheduler",
        karras: None,
        flow: None,
    },
    SchedulerName {
        name: "tcd",
        a1111: "TCD",
        aliases: &[],
        class: "TCDScheduler",
        karras: None,
        flow: None,
    },
    SchedulerName {
        name: "heun",
        a1111: "Heun",
        aliases: &["k_heun"],
        class: "FlowMatchHeunDiscreteScheduler",
        karras: None,
        flow: Some("FlowMatchHeunDiscreteScheduler"),
    },
];

/// A spelling reduced to compare: lower case, spaces and underscores as `-`, `++`
/// as `pp`, `-ancestral` as `-a`.
fn key(spelling: &str) -> String {
    spelling
        .to_ascii_lowercase()
        .replace([' ', '_'], "-")
        .replace("++", "pp")
        .replace("-ancestral", "-a")
}

impl SchedulerName {
    /// The entry `spelling` names: ours, A1111's or an alias, ignoring case, spaces,
    /// underscores and `++` / `pp`.
    pub fn find(spelling: &str) -> Option<&'static SchedulerName> {
        let k = key(spelling);
        SCHEDULER_NAMES.iter().find(|e| {
            key(e.name) == k || key(e.a1111) == k || e.aliases.iter().any(|a| key(a) == k)
        })
    }

    /// A1111's label for `spelling` (`"euler-a"` -> `"Euler a"`), or `spelling`
    /// itself when no entry has it.
    pub fn label(spelling: &str) -> &str {
        Self::find(spelling).map_or(spelling, |e| e.a1111)
    }

    /// Our names, comma-separated (for error messages).
    pub fn known() -> String {
        SCHEDULER_NAMES
            .iter()
            .map(|e| e.name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether `class` is a flow-matching class (`FlowMatch*`).
    fn is_flow_class(class: &str) -> bool {
        class.starts_with("FlowMatch")
    }

    /// Whether a model's scheduler config is a flow-matching one (SD 3.x).
    pub fn is_flow_config(base: &SchedulerConfig) -> bool {
        base.class_name.as_deref().is_some_and(Self::is_flow_class)
    }

    /// The class this name builds over a flow-matching (`flow`) or diffusion config,
    /// or `None` where it has no such form.
    pub fn class_for(&self, flow: bool) -> Option<&'static str> {
        if flow {
            self.flow
        } else {
            Some(self.class).filter(|c| !Self::is_flow_class(c))
        }
    }

    /// Our names that apply to a flow-matching (`flow`) or diffusion model,
    /// comma-separated.
    pub fn known_for(flow: bool) -> String {
        SCHEDULER_NAMES
            .iter()
            .filter(|e| e.class_for(flow).is_some())
            .map(|e| e.name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `base` with this entry's overrides; over a flow-matching config, DPM++ walks
    /// flow sigmas with the config's shift (diffusers' `use_flow_sigmas`,
    /// `flow_shift`, `prediction_type: "flow_prediction"`).
    pub fn config(&self, base: &SchedulerConfig) -> SchedulerConfig {
        let mut c = base.clone();
        if let Some(k) = self.karras {
            c.use_karras_sigmas = Some(k);
        }
        if Self::is_flow_config(base) && self.flow == Some("DPMSolverMultistepScheduler") {
            c.use_flow_sigmas = Some(true);
            c.flow_shift = Some(base.shift.unwrap_or(1.0));
            c.prediction_type = Some("flow_prediction".into());
            c.use_karras_sigmas = None;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_names_one_entry() {
        for (spelling, name) in [
            ("Euler a", "euler-a"),
            ("euler_ancestral", "euler-a"),
            ("k_euler_ancestral", "euler-a"),
            ("DPM++ 2M Karras", "dpmpp-2m-karras"),
            ("dpm-solver++", "dpmpp-2m"),
            ("PLMS", "pndm"),
            ("TCD", "tcd"),
            ("lcm", "lcm"),
        ] {
            assert_eq!(
                SchedulerName::find(spelling).map(|e| e.name),
                Some(name),
                "{spelling}"
            );
        }
        assert_eq!(SchedulerName::find("heun").map(|e| e.name), Some("heun"));
        assert_eq!(SchedulerName::find("dpm2"), None);
        assert_eq!(SchedulerName::label("dpmpp-2m"), "DPM++ 2M");
        // No spelling names two entries.
        let mut owner = std::collections::HashMap::new();
        for e in SCHEDULER_NAMES {
            for s in [e.name, e.a1111].iter().chain(e.aliases) {
                let previous = owner.insert(key(s), e.name);
                assert!(
                    previous.is_none_or(|p| p == e.name),
                    "{s}: {previous:?} and {}",
                    e.name
                );
            }
        }
    }
}
