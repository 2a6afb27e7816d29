package istio

import (
	"encoding/json"
	"path/filepath"
	"testing"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"mesh-filters/tests/istio/mesh"
)

// The cluster istio/global-ratelimit/ names as the global rule's `service`.
const rlsCluster = "outbound|8081||ratelimit.ratelimit.svc.cluster.local"

// TestTheGlobalRuleNamesTheClusterIstioGenerates: with
// istio/global-ratelimit/ (the RLS Service and the plugin, each form),
// istiod gives the frontend sidecar a cluster of exactly the name the rule's
// `service` says, with HTTP/2 (gRPC needs it), and hands the rule over
// unchanged. Writes the cluster and the plugin (after the agent's rewrite)
// to MESH_ISTIO_OUT/global-<form>/ for the Rust test to load into Envoy.
func TestTheGlobalRuleNamesTheClusterIstioGenerates(t *testing.T) {
	out := env(t, "MESH_ISTIO_OUT")
	for _, form := range []string{"wasmplugin", "trafficextension"} {
		t.Run(form, func(t *testing.T) {
			yaml, err := mesh.GlobalManifests(form)
			if err != nil {
				t.Fatal(err)
			}
			yaml, err = mesh.PointAt(yaml, env(t, "MESH_REGISTRY"), "artifact", mesh.ByTag, pushed(t))
			if err != nil {
				t.Fatal(err)
			}
			plugins, err := mesh.Plugins(yaml)
			if err != nil {
				t.Fatal(err)
			}
			if len(plugins) != 1 || plugins[0].Filter() != "ratelimit" {
				t.Fatalf("one ratelimit plugin expected: %v", plugins)
			}
			g := mesh.Generate(t, yaml)

			var rls *cluster.Cluster
			var names []string
			for _, c := range g.Clusters {
				names = append(names, c.GetName())
				if c.GetName() == rlsCluster {
					rls = c
				}
			}
			if rls == nil {
				t.Fatalf("istiod generated no cluster %s; it has %v", rlsCluster, names)
			}
			options := &upstreamhttp.HttpProtocolOptions{}
			raw := rls.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
			if raw == nil {
				t.Fatalf("%s has no HttpProtocolOptions: %v", rlsCluster, rls.GetTypedExtensionProtocolOptions())
			}
			if err := raw.UnmarshalTo(options); err != nil {
				t.Fatal(err)
			}
			if options.GetExplicitHttpConfig().GetHttp2ProtocolOptions() == nil {
				t.Errorf("%s does not speak HTTP/2: %v", rlsCluster, options)
			}

			if len(g.Extensions) != 1 {
				t.Fatalf("ECDS filters %v", g.ECDSFilters)
			}
			sv := &wrapperspb.StringValue{}
			if err := wasmOf(t, mesh.ExtensionConfig(t, g.Extensions[0])).GetConfig().GetConfiguration().UnmarshalTo(sv); err != nil {
				t.Fatal(err)
			}
			var config struct {
				Rules []struct {
					Global struct {
						Service string `json:"service"`
					} `json:"global"`
				} `json:"rules"`
			}
			if err := json.Unmarshal([]byte(sv.GetValue()), &config); err != nil {
				t.Fatal(err)
			}
			if len(config.Rules) == 0 || config.Rules[0].Global.Service != rlsCluster {
				t.Errorf("the rule's service in what Envoy gets: %s", sv.GetValue())
			}

			agent := mesh.NewAgent(filepath.Join(out, "cache", "global-"+form), registryHost(t))
			defer agent.Close()
			rewritten, err := agent.Rewrite(g.Extensions)
			if err != nil {
				t.Fatalf("the agent refused the ECDS resource: %v", err)
			}
			checkLocalModules(t, form, rewritten, plugins)
			dir := filepath.Join(out, "global-"+form)
			writeJSON(t, filepath.Join(dir, "rls-cluster.json"), rls)
			writeJSON(t, filepath.Join(dir, "route-config.json"), g.RouteConfig)
			writeExtensions(t, dir, rewritten, plugins)
		})
	}
}
