//! The `rm` run: forget an image. Steps `activations` (with `--force`:
//! deactivate and delete every activation of the image, each as a nested
//! `deactivate` run; without it, refuse while any exists) and `forget`
//! (delete the image row; its chains become unused and `gc` frees them).

use serde::{Deserialize, Serialize};

use super::{activate, Ctx, RunKind};
use crate::error::{Error, Kind, Result};
use crate::journal::{Completion, Executor, RunSpec, StepCx};
use crate::store::images as q;

/// The executor of `rm` runs.
pub struct Remove<'a> {
    pub ctx: &'a mut Ctx,
}

/// The run `rm IMAGE [--force]`.
pub fn rm_spec(image: &str, force: bool) -> RunSpec {
    RunSpec {
        kind: RunKind::Rm.as_str().into(),
        subject: image.into(),
        request: serde_json::json!(RemoveRequest { force }),
        steps: vec![RemoveStep::Activations.as_str().into(), RemoveStep::Forget.as_str().into()],
    }
}

journal_enum! {
    /// An `rm` run's steps.
    RemoveStep, "rm step" { Activations = "activations", Forget = "forget" }
}

/// The request of an `rm` run.
#[derive(Debug, Serialize, Deserialize)]
struct RemoveRequest {
    /// Deactivate and delete the image's activations (else refuse).
    #[serde(default)]
    force: bool,
}

impl Executor for Remove<'_> {
    fn step(&mut self, cx: &mut StepCx<'_>) -> Result<()> {
        let image = cx.subject.clone();
        match RemoveStep::parse(&cx.step)? {
            RemoveStep::Activations => {
                let acts = q::activations_of(cx.conn, &image)?;
                if acts.is_empty() {
                    return Ok(());
                }
                if !cx.request_as::<RemoveRequest>()?.force {
                    let names: Vec<&str> = acts.iter().map(|a| a.name.as_str()).collect();
                    return Err(Error::new(
                        Kind::TempFail,
                        format!(
                            "image {image} has activations ({}); deactivate them or pass --force",
                            names.join(", ")
                        ),
                    ));
                }
                for a in acts {
                    let mut d = activate::Deactivate { ctx: self.ctx };
                    cx.run_nested(&activate::deactivate_spec(&a.name, true), &mut d)?;
                }
                Ok(())
            }
            RemoveStep::Forget => cx.complete(move |tx| {
                q::delete_image(tx, &image)?;
                Ok(Completion::default())
            }),
        }
    }
}
