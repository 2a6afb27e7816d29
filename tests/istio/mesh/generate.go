// Package mesh runs this project's Istio manifests through Istio's own code:
// istiod's config pipeline (the in-memory discovery server of Istio's tests)
// for the `frontend` sidecar, and the sidecar agent's Wasm fetcher and ECDS
// rewrite (pkg/wasm).
package mesh

import (
	"fmt"
	"strings"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"istio.io/istio/pilot/pkg/config/kube/crd"
	"istio.io/istio/pilot/pkg/model"
	v3 "istio.io/istio/pilot/pkg/xds/v3"
	"istio.io/istio/pilot/test/xds"
	"istio.io/istio/pkg/config/constants"
	"istio.io/istio/pkg/test"
	"istio.io/istio/pkg/util/sets"
)

// The workload the manifests select (`app: frontend` in namespace `shop`)
// and the service it calls (`reviews`, port 9080).
const (
	Namespace   = "shop"
	ServicePort = 9080
	// ProxyIstioVersion is the version the sidecar announces; istiod
	// generates for it (the fake server's default is far older).
	ProxyIstioVersion = "1.30.0"
	// DomainSuffix is the cluster's DNS domain.
	DomainSuffix = "cluster.local"
)

// reviewsService is the Kubernetes Service behind `reviews` (the
// VirtualService's host); its subsets v1 and v2 come from the DestinationRule.
const reviewsService = `
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: shop
spec:
  clusterIP: 10.0.0.20
  ports:
  - name: http
    port: 9080
  selector:
    app: reviews
`

// Generated is what istiod sends the frontend sidecar, as far as the
// plugins are concerned.
type Generated struct {
	// HTTPFilters are the names of the HTTP filters of the outbound HTTP
	// listener on port 9080, in order.
	HTTPFilters []string
	// ECDSFilters are the names of those filters that come by ECDS
	// (config_discovery), in order.
	ECDSFilters []string
	// RouteConfig is the outbound route configuration for port 9080.
	RouteConfig *route.RouteConfiguration
	// Extensions are the ECDS resources for ECDSFilters, in that order.
	Extensions []*anypb.Any
	// Clusters are the sidecar's clusters (CDS).
	Clusters []*cluster.Cluster
}

// Generate starts Istio's in-memory discovery server with `configYAML`
// (Istio resources, and Kubernetes Services, which go to its
// Kubernetes objects) and the reviews Service, and returns what it generates
// for the frontend sidecar.
func Generate(t test.Failer, configYAML string) *Generated {
	configs, _, err := crd.ParseInputs(configYAML)
	if err != nil {
		t.Fatalf("Istio refuses the manifests: %v", err)
	}
	for i := range configs {
		// As Kubernetes' config controller sets it: without it a short
		// host like `reviews` would resolve to `reviews.shop`.
		configs[i].Domain = DomainSuffix
	}
	kubeObjects := reviewsService
	for _, doc := range strings.Split(configYAML, "\n---") {
		if strings.Contains(doc, "\nkind: Service\n") {
			kubeObjects += "\n---\n" + doc
		}
	}
	s := xds.NewFakeDiscoveryServer(t, xds.FakeOptions{
		Configs:                configs,
		KubernetesObjectString: kubeObjects,
	})
	// The config reaches the push context asynchronously; wait for it.
	s.EnsureSynced(t)
	proxy := s.SetupProxy(&model.Proxy{
		ConfigNamespace: Namespace,
		Labels:          map[string]string{"app": "frontend"},
		Metadata: &model.NodeMetadata{
			ClusterID:    constants.DefaultClusterName,
			Namespace:    Namespace,
			Labels:       map[string]string{"app": "frontend"},
			IstioVersion: ProxyIstioVersion,
		},
		IstioVersion: model.ParseIstioVersion(ProxyIstioVersion),
	})

	g := &Generated{}
	listenerName := fmt.Sprintf("0.0.0.0_%d", ServicePort)
	var outbound *listener.Listener
	for _, l := range s.Listeners(proxy) {
		if l.GetName() == listenerName {
			outbound = l
		}
	}
	if outbound == nil {
		t.Fatalf("istiod generated no listener %s for the frontend sidecar", listenerName)
		return nil
	}
	manager := httpConnectionManager(t, outbound)
	for _, f := range manager.GetHttpFilters() {
		g.HTTPFilters = append(g.HTTPFilters, f.GetName())
		if f.GetConfigDiscovery() != nil {
			g.ECDSFilters = append(g.ECDSFilters, f.GetName())
		}
	}
	routeName := manager.GetRds().GetRouteConfigName()
	for _, rc := range s.Routes(proxy) {
		if rc.GetName() == routeName {
			g.RouteConfig = rc
		}
	}
	if g.RouteConfig == nil {
		t.Fatalf("no route configuration %q for listener %s", routeName, listenerName)
	}

	g.Clusters = s.Clusters(proxy)

	gen := s.Discovery.Generators[v3.ExtensionConfigurationType]
	resources, _, err := gen.Generate(proxy, &model.WatchedResource{ResourceNames: sets.New(g.ECDSFilters...)},
		&model.PushRequest{Forced: true, Push: s.PushContext(), Start: time.Now()})
	if err != nil {
		t.Fatalf("ECDS: %v", err)
	}
	byName := map[string]*anypb.Any{}
	for _, r := range resources {
		byName[r.Name] = r.Resource
	}
	for _, name := range g.ECDSFilters {
		r, ok := byName[name]
		if !ok {
			t.Fatalf("the listener names ECDS filter %q, ECDS has none", name)
		}
		g.Extensions = append(g.Extensions, r)
	}
	return g
}

func httpConnectionManager(t test.Failer, l *listener.Listener) *hcm.HttpConnectionManager {
	for _, chain := range l.GetFilterChains() {
		for _, f := range chain.GetFilters() {
			if f.GetName() != "envoy.filters.network.http_connection_manager" {
				continue
			}
			m := &hcm.HttpConnectionManager{}
			if err := f.GetTypedConfig().UnmarshalTo(m); err != nil {
				t.Fatalf("listener %s: %v", l.GetName(), err)
			}
			return m
		}
	}
	t.Fatalf("listener %s has no HTTP connection manager", l.GetName())
	return nil
}

// ExtensionConfig unpacks one ECDS resource.
func ExtensionConfig(t test.Failer, r *anypb.Any) *core.TypedExtensionConfig {
	ec := &core.TypedExtensionConfig{}
	if err := r.UnmarshalTo(ec); err != nil {
		t.Fatalf("ECDS resource %s: %v", r.GetTypeUrl(), err)
	}
	return ec
}
