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
}

/// Every scheduler name [`crate::AnyScheduler::from_name`] knows. A scheduler
/// family added to the crate (flow matching: `FlowMatchEulerDiscreteScheduler` with
/// its shift) adds its rows here and its class to `AnyScheduler::from_class`.
pub const SCHEDULER_NAMES: &[SchedulerName] = &[
    SchedulerName {
        name: "ddim",
        a1111: "DDIM",
        aliases: &[],
        class: "DDIMScheduler",
        karras: None,
    },
    SchedulerName {
        name: "euler",
        a1111: "Euler",
        aliases: &["k_euler"],
        class: "EulerDiscreteScheduler",
        karras: None,
    },
    SchedulerName {
        name: "euler-a",
        a1111: "Euler a",
        aliases: &["eulera", "k_euler_a", "k_euler_ancestral"],
        class: "EulerAncestralDiscreteScheduler",
        karras: None,
    },
    SchedulerName {
        name: "dpmpp-2m",
        a1111: "DPM++ 2M",
        aliases: &["dpm-solver++", "dpmpp2m", "k_dpmpp_2m"],
        class: "DPMSolverMultistepScheduler",
        karras: Some(false),
    },
    SchedulerName {
        name: "dpmpp-2m-karras",
        a1111: "DPM++ 2M Karras",
        aliases: &["k_dpmpp_2m_ka"],
        class: "DPMSolverMultistepScheduler",
        karras: Some(true),
    },
    SchedulerName {
        name: "lms",
        a1111: "LMS",
        aliases: &["k_lms"],
        class: "LMSDiscreteScheduler",
        karras: None,
    },
    SchedulerName {
        name: "pndm",
        a1111: "PLMS",
        aliases: &[],
        class: "PNDMScheduler",
        karras: None,
    },
    SchedulerName {
        name: "lcm",
        a1111: "LCM",
        aliases: &["k_lcm"],
        class: "LCMScheduler",
        karras: None,
    },
    SchedulerName {
        name: "tcd",
        a1111: "TCD",
        aliases: &[],
        class: "TCDScheduler",
        karras: None,
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

    /// `base` with this entry's overrides.
    pub fn config(&self, base: &SchedulerConfig) -> SchedulerConfig {
        let mut c = base.clone();
        if let Some(k) = self.karras {
            c.use_karras_sigmas = Some(k);
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
        assert_eq!(SchedulerName::find("heun"), None);
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
