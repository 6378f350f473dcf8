//! Resource enrichment: every resource says which node it came from.
//!
//! On Kubernetes the attribute is `k8s.node.name`, elsewhere `host.name`; a sender that set
//! either keeps its own value.

use crate::signal::{string_attribute, Payload};

pub const K8S_NODE_NAME: &str = "k8s.node.name";
pub const HOST_NAME: &str = "host.name";

#[derive(Debug, Clone)]
pub struct NodeEnricher {
    key: &'static str,
    node_name: String,
}

impl NodeEnricher {
    pub fn new(node_name: String, in_kubernetes: bool) -> Self {
        let key = if in_kubernetes { K8S_NODE_NAME } else { HOST_NAME };
        NodeEnricher { key, node_name }
    }

    /// Detects Kubernetes the way client libraries do: the service host variable every pod gets.
    pub fn for_environment(node_name: String) -> Self {
        NodeEnricher::new(node_name, std::env::var_os("KUBERNETES_SERVICE_HOST").is_some())
    }

    pub fn process<T: Payload>(&self, payload: &mut T) {
        if self.node_name.is_empty() {
            return;
        }
        for resource in payload.resources_mut() {
            let has_node = resource
                .attributes
                .iter()
                .any(|kv| kv.key == K8S_NODE_NAME || kv.key == HOST_NAME);
            if !has_node {
                resource.attributes.push(string_attribute(self.key, &self.node_name));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::Traces;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::ResourceSpans;

    fn with_resources(resources: Vec<Option<Resource>>) -> Traces {
        Traces {
            resource_spans: resources
                .into_iter()
                .map(|resource| ResourceSpans { resource, ..Default::default() })
                .collect(),
        }
    }

    fn attrs(t: &Traces, i: usize) -> Vec<String> {
        t.resource_spans[i].resource.as_ref().unwrap().attributes.iter().map(|kv| kv.key.clone()).collect()
    }

    #[test]
    fn adds_host_name_outside_kubernetes_unless_set() {
        let sender_set = Resource { attributes: vec![string_attribute(HOST_NAME, "theirs")], ..Default::default() };
        let mut t = with_resources(vec![None, Some(sender_set)]);
        NodeEnricher::new("node-1".into(), false).process(&mut t);
        assert_eq!(attrs(&t, 0), vec![HOST_NAME]);
        assert_eq!(attrs(&t, 1), vec![HOST_NAME]);
        let kept = &t.resource_spans[1].resource.as_ref().unwrap().attributes[0];
        assert_eq!(kept, &string_attribute(HOST_NAME, "theirs"));
    }

    #[test]
    fn adds_k8s_node_name_in_kubernetes() {
        let mut t = with_resources(vec![Some(Resource::default())]);
        NodeEnricher::new("node-1".into(), true).process(&mut t);
        assert_eq!(t.resource_spans[0].resource.as_ref().unwrap().attributes[0], string_attribute(K8S_NODE_NAME, "node-1"));
    }
}
