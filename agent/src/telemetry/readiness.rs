//! Which components have started. `/readyz` is green only when every registered component
//! reports ready; until then it lists the ones that are not, with their reasons.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Starting,
    Ready,
    Failed(String),
    Stopping,
}

/// Shared registry of component states.
#[derive(Clone, Default)]
pub struct Readiness {
    components: Arc<Mutex<BTreeMap<String, State>>>,
}

impl Readiness {
    /// Registers a component as starting and returns the handle it reports through.
    pub fn register(&self, name: impl Into<String>) -> ReadyHandle {
        let name = name.into();
        self.lock().insert(name.clone(), State::Starting);
        ReadyHandle { readiness: self.clone(), name }
    }

    /// `Ok` when every component is ready, else one reason per component that is not.
    pub fn check(&self) -> Result<usize, Vec<String>> {
        let components = self.lock();
        let problems: Vec<String> = components
            .iter()
            .filter_map(|(name, state)| match state {
                State::Ready => None,
                State::Starting => Some(format!("{name}: starting")),
                State::Failed(why) => Some(format!("{name}: failed: {why}")),
                State::Stopping => Some(format!("{name}: stopping")),
            })
            .collect();
        if problems.is_empty() {
            Ok(components.len())
        } else {
            Err(problems)
        }
    }

    /// Marks every component as stopping (the agent is shutting down).
    pub fn stopping(&self) {
        for state in self.lock().values_mut() {
            *state = State::Stopping;
        }
    }

    fn set(&self, name: &str, state: State) {
        if let Some(slot) = self.lock().get_mut(name) {
            *slot = state;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, State>> {
        // A poisoned lock only means a panic elsewhere while holding it; the map is still valid.
        self.components.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A component's view of its own readiness.
#[derive(Clone)]
pub struct ReadyHandle {
    readiness: Readiness,
    name: String,
}

impl ReadyHandle {
    pub fn ready(&self) {
        self.readiness.set(&self.name, State::Ready);
    }

    pub fn failed(&self, reason: impl Into<String>) {
        self.readiness.set(&self.name, State::Failed(reason.into()));
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_component_is() {
        let readiness = Readiness::default();
        let a = readiness.register("a");
        let b = readiness.register("b");
        a.ready();
        assert_eq!(readiness.check(), Err(vec!["b: starting".to_string()]));
        b.failed("bind: address in use");
        assert_eq!(readiness.check(), Err(vec!["b: failed: bind: address in use".to_string()]));
        b.ready();
        assert_eq!(readiness.check(), Ok(2));
        readiness.stopping();
        assert!(readiness.check().is_err());
    }
}
