//! Faults the unit tests inject into a running server (compiled only for them): a panic in a
//! model's batched step, a slow load. Each is armed for one model id, so tests running side by
//! side in the same process, each with its own models, never see each other's faults.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Clone, Copy)]
enum Fault {
    /// Every step of the model's batch panics.
    PanicInStep,
    /// The model's loads take this much longer.
    SlowLoad(Duration),
}

static ARMED: Mutex<Option<HashMap<String, Fault>>> = Mutex::new(None);

fn set(model: &str, fault: Option<Fault>) {
    let mut armed = ARMED.lock().unwrap_or_else(|e| e.into_inner());
    let map = armed.get_or_insert_with(HashMap::new);
    match fault {
        Some(f) => map.insert(model.to_string(), f),
        None => map.remove(model),
    };
}

fn get(model: &str) -> Option<Fault> {
    let armed = ARMED.lock().unwrap_or_else(|e| e.into_inner());
    armed.as_ref().and_then(|m| m.get(model).copied())
}

pub fn panic_in_step(model: &str) {
    set(model, Some(Fault::PanicInStep));
}

pub fn slow_load(model: &str, delay: Duration) {
    set(model, Some(Fault::SlowLoad(delay)));
}

pub fn clear(model: &str) {
    set(model, None);
}

/// Called in each request's part of a batched step, after the forward pass.
pub fn step(model: &str) {
    if let Some(Fault::PanicInStep) = get(model) {
        panic!("injected panic in the step of `{model}`");
    }
}

/// Called by the loader thread before it reads a model.
pub fn delay_load(model: &str) {
    if let Some(Fault::SlowLoad(delay)) = get(model) {
        std::thread::sleep(delay);
    }
}
