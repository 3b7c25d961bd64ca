//! Conversions between the WIT bindings' types and the model's.

use super::wit;
use flotilla_model::{self as model, Hook};

pub(super) fn wit_node(n: &model::Node) -> wit::Node {
    wit::Node {
        id: n.id.clone(),
        version: n.version.clone(),
        labels: n.labels.clone(),
        attributes: n.attributes.clone(),
        asset_path: n.asset_path.clone(),
        healthy: n.healthy,
        schedulable: n.schedulable,
        online: n.online,
        last_seen: n.last_seen,
    }
}

pub(super) fn wit_ctx(c: &model::TaskContext) -> wit::TaskContext {
    wit::TaskContext {
        task_id: c.task_id.clone(),
        name: c.name.clone(),
        package: c.package.clone(),
        target_version: c.target_version.clone(),
        source_versions: c.source_versions.clone(),
        strategy: match c.strategy {
            model::Strategy::Snapshot => wit::Strategy::Snapshot,
            model::Strategy::Increment => wit::Strategy::Increment,
        },
        method: match c.method {
            model::Method::Push => wit::DeliveryMethod::Push,
            model::Method::Pull => wit::DeliveryMethod::Pull,
        },
        concurrency: c.concurrency,
        backup: match &c.backup {
            model::Backup::Default => wit::Backup::AgentDefault,
            model::Backup::Location(l) => wit::Backup::Location(l.clone()),
            model::Backup::None => wit::Backup::None,
        },
        permanent: c.permanent,
        params: c.params.to_string(),
        retries_failed: c.retries_failed,
        retries_timed_out: c.retries_timed_out,
    }
}

pub(super) fn selector_from(s: wit::Selector) -> model::Selector {
    model::Selector {
        ids: s.ids,
        labels: s.labels,
        attributes: s.attributes,
        asset_trees: s.asset_trees,
    }
}

pub(super) fn selection_from(s: wit::Selection) -> model::Selection {
    match s {
        wit::Selection::Include => model::Selection::Include,
        wit::Selection::Skip(skip) => model::Selection::Skip {
            reason: match skip.reason {
                wit::SkipReason::SameVersion => model::SkipReason::SameVersion,
                wit::SkipReason::Unhealthy => model::SkipReason::Unhealthy,
                wit::SkipReason::BusyInAnotherTask => model::SkipReason::BusyInAnotherTask,
                wit::SkipReason::OutOfRange => model::SkipReason::OutOfRange,
                wit::SkipReason::Policy => model::SkipReason::Policy,
            },
            detail: skip.detail,
        },
    }
}

pub(super) fn hook_from(h: wit::Hook) -> Hook {
    match h {
        wit::Hook::Select => Hook::Select,
        wit::Hook::Plan => Hook::Plan,
        wit::Hook::Admit => Hook::Admit,
        wit::Hook::Evaluate => Hook::Evaluate,
        wit::Hook::OnRequest => Hook::OnRequest,
    }
}

pub(super) fn plan_calls_from(p: wit::PlanCalls) -> model::PlanCalls {
    match p {
        wit::PlanCalls::InOrder => model::PlanCalls::InOrder,
        wit::PlanCalls::Independent => model::PlanCalls::Independent,
    }
}
