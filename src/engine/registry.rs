//! Per-language template slots shared by every lane: a language's template is
//! *building* until a background thread publishes it as *ready* (or records
//! why it *failed*). A slot changes state once, so readers (every exec
//! request) take no lock: each slot is a pair of `OnceLock`s, read with one
//! atomic load.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::api::{Language, TemplateAvailability};

/// The state of one language's slot, as seen by a reader.
#[derive(Debug, PartialEq, Eq)]
pub enum SlotState<'a, T> {
    /// Still to be built or loaded: for this long since [`TemplateSlots::start`]
    /// was called for it, `None` while it waits for its turn.
    Building(Option<Duration>),
    Ready(&'a Arc<T>),
    Failed(&'a str),
    /// The registry has no slot for the language.
    NotServed,
}

impl<T> SlotState<'_, T> {
    pub fn availability(&self) -> TemplateAvailability {
        match self {
            SlotState::Building(_) => TemplateAvailability::Building,
            SlotState::Ready(_) => TemplateAvailability::Ready,
            SlotState::Failed(why) => TemplateAvailability::Failed((*why).to_string()),
            SlotState::NotServed => TemplateAvailability::NotServed,
        }
    }
}

/// Why publishing into a slot was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("language {0} is not served by this registry")]
    NotServed(&'static str),
    #[error("the {0} template slot is already ready or failed")]
    AlreadySet(&'static str),
}

struct Slot<T> {
    language: Language,
    started: OnceLock<Instant>,
    ready: OnceLock<Arc<T>>,
    failed: OnceLock<String>,
}

/// A fixed set of languages, each with a slot that goes from building to
/// ready or failed exactly once. Meant for one publishing thread (the one
/// that builds the templates) and any number of readers.
pub struct TemplateSlots<T> {
    slots: Vec<Slot<T>>,
}

impl<T> TemplateSlots<T> {
    /// Slots for `languages` (in this order, duplicates dropped), all building.
    pub fn building(languages: &[Language]) -> Self {
        let mut slots: Vec<Slot<T>> = Vec::with_capacity(languages.len());
        for &language in languages {
            if slots.iter().all(|s| s.language != language) {
                slots.push(Slot {
                    language,
                    started: OnceLock::new(),
                    ready: OnceLock::new(),
                    failed: OnceLock::new(),
                });
            }
        }
        TemplateSlots { slots }
    }

    /// Served languages, in slot order.
    pub fn languages(&self) -> Vec<Language> {
        self.slots.iter().map(|s| s.language).collect()
    }

    fn slot(&self, language: Language) -> Option<&Slot<T>> {
        self.slots.iter().find(|s| s.language == language)
    }

    pub fn state(&self, language: Language) -> SlotState<'_, T> {
        let Some(slot) = self.slot(language) else {
            return SlotState::NotServed;
        };
        if let Some(t) = slot.ready.get() {
            return SlotState::Ready(t);
        }
        if let Some(why) = slot.failed.get() {
            return SlotState::Failed(why);
        }
        SlotState::Building(slot.started.get().map(Instant::elapsed))
    }

    /// Records that building or loading `language`'s template has begun (for
    /// the time shown while it builds); later calls keep the first time.
    pub fn start(&self, language: Language) {
        if let Some(slot) = self.slot(language) {
            let _ = slot.started.set(Instant::now());
        }
    }

    /// The ready template of `language`, if any.
    pub fn ready(&self, language: Language) -> Option<&Arc<T>> {
        self.slot(language).and_then(|s| s.ready.get())
    }

    pub fn set_ready(&self, language: Language, template: Arc<T>) -> Result<(), PublishError> {
        let slot = self
            .slot(language)
            .ok_or(PublishError::NotServed(language.as_str()))?;
        if slot.failed.get().is_some() {
            return Err(PublishError::AlreadySet(language.as_str()));
        }
        slot.ready
            .set(template)
            .map_err(|_| PublishError::AlreadySet(language.as_str()))
    }

    pub fn set_failed(&self, language: Language, why: String) -> Result<(), PublishError> {
        let slot = self
            .slot(language)
            .ok_or(PublishError::NotServed(language.as_str()))?;
        if slot.ready.get().is_some() {
            return Err(PublishError::AlreadySet(language.as_str()));
        }
        slot.failed
            .set(why)
            .map_err(|_| PublishError::AlreadySet(language.as_str()))
    }

    /// True when no slot is still building.
    pub fn settled(&self) -> bool {
        self.slots
            .iter()
            .all(|s| s.ready.get().is_some() || s.failed.get().is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_start_building_and_settle_once() {
        let slots = TemplateSlots::<u32>::building(&[Language::Python, Language::Node]);
        assert_eq!(slots.languages(), vec![Language::Python, Language::Node]);
        assert_eq!(slots.state(Language::Python), SlotState::Building(None));
        slots.start(Language::Python);
        assert!(matches!(
            slots.state(Language::Python),
            SlotState::Building(Some(_))
        ));
        assert_eq!(
            slots.state(Language::Node).availability(),
            TemplateAvailability::Building
        );
        assert!(!slots.settled());

        slots.set_ready(Language::Python, Arc::new(7)).unwrap();
        assert_eq!(
            slots.state(Language::Python),
            SlotState::Ready(&Arc::new(7))
        );
        assert_eq!(slots.ready(Language::Python).map(|t| **t), Some(7));
        assert_eq!(
            slots.set_ready(Language::Python, Arc::new(8)),
            Err(PublishError::AlreadySet("python"))
        );
        assert_eq!(
            slots.set_failed(Language::Python, "late".into()),
            Err(PublishError::AlreadySet("python"))
        );
        assert!(!slots.settled());

        slots
            .set_failed(Language::Node, "rootfs build failed".into())
            .unwrap();
        assert_eq!(
            slots.state(Language::Node).availability(),
            TemplateAvailability::Failed("rootfs build failed".into())
        );
        assert_eq!(
            slots.set_ready(Language::Node, Arc::new(1)),
            Err(PublishError::AlreadySet("node"))
        );
        assert!(slots.ready(Language::Node).is_none());
        assert!(slots.settled());
    }

    #[test]
    fn unknown_languages_are_not_served() {
        let slots = TemplateSlots::<u32>::building(&[Language::Node, Language::Node]);
        assert_eq!(slots.languages(), vec![Language::Node]);
        assert_eq!(slots.state(Language::Python), SlotState::NotServed);
        assert_eq!(
            slots.set_ready(Language::Python, Arc::new(1)),
            Err(PublishError::NotServed("python"))
        );
    }

    #[test]
    fn a_published_template_is_seen_by_other_threads() {
        let slots = Arc::new(TemplateSlots::<String>::building(&[Language::Python]));
        let writer = {
            let slots = slots.clone();
            std::thread::spawn(move || {
                slots
                    .set_ready(Language::Python, Arc::new("t".into()))
                    .unwrap()
            })
        };
        writer.join().unwrap();
        assert_eq!(slots.ready(Language::Python).map(|t| t.as_str()), Some("t"));
    }
}
